"""The `mst-clipiqa` command: the Trainer's fit, validate, test and predict (LightningCLI, see `cli.trainer`), and
the commands below, declared as functions whose signature and docstring are their options and --help.

This module imports neither torch nor Lightning, so that the overview and the commands' help answer at once. A user's
mistake ends in one message naming the culprit (exit status 2 for a usage error, 1 for the rest); ``--debug`` or
``MST_CLIPIQA_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import time
import typing
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mst_clipiqa.cli.parse_errors import (
    NEED_WEIGHTS,
    SuggestingErrors,
    did_you_mean,
    explain,
    no_weights,
    read_configs,
)
from mst_clipiqa.errors import MSTCLIPIQAError, OptionError
from mst_clipiqa.internals import option_actions
from mst_clipiqa.scoring import FORMATS

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser

PROG = "mst-clipiqa"
DEBUG_FLAG = "--debug"
DEBUG_ENV = "MST_CLIPIQA_DEBUG"

TRAINER_COMMANDS = {
    "fit": "train on a data set's training split; checkpoints ranked by validation SRCC",
    "validate": "validation metrics (SRCC, PLCC, KRCC, RMSE) of a checkpoint",
    "test": "test metrics of a checkpoint on the held-out split",
    "predict": "a checkpoint's scores for a data set's images, written to predictions.csv",
}
"""LightningCLI's commands, with their line of the overview."""

USER_ERRORS = (MSTCLIPIQAError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
"""What a user's input causes: reported in one message, without a traceback. Lightning's MisconfigurationException
(an impossible Trainer setting) joins them where Lightning is loaded."""


# ---- the commands beyond the Trainer's ---------------------------------------------------------------------------


def benchmark(
    fit_args: list[str],
    splits: int | None = None,
    variants: list[Literal["template", "prompt"]] | None = None,
    targets: list[Literal["quality", "alignment", "correspondence", "authenticity"]] | None = None,
    output: str | None = None,
    name: str | None = None,
    together: bool = False,
    cross: list[str] | None = None,
    configs: list[str] | None = None,
) -> None:
    """Fit and test every split of a protocol, per head and target: median and mean SRCC, PLCC, KRCC.

    Writes results.csv (per run), summary.csv and results.md (median, mean, spread) to the output folder and prints
    them. Every other option (--config, --trainer.max_epochs, ...) goes to each fit, as in `mst-clipiqa fit`; a run's
    saved config.yaml works as --config.

    Args:
        fit_args: options of `mst-clipiqa fit` shared by every run.
        splits: run the protocol's first N splits (null: all of them)
        variants: head variants to run, e.g. --variants template prompt (null: the config's)
        targets: targets to run, e.g. --targets quality alignment (null: the config's)
        output: folder of the reports (null: <trainer.default_root_dir>/<name>)
        name: benchmark name: output folder and loggers' run group (null: benchmark-<time>)
        together: train the splits of each head and target in one loop over the shared features: the same
            results as one fit per split, in less time; one device, one logger run per head and target
        cross: also test each run on every labelled row of other releases, as source=folder, e.g.
            --cross agiqa-1k=data/AGIQA-1K aigciqa2023=data/AIGCIQA2023; cross.md holds the train x test matrix
        configs: configs whose runs each fill a row of the --cross matrix (reports in <output>/<config>/)
    """
    from mst_clipiqa.cli.benchmark import Benchmark, cross_benchmark

    pairs = [item.partition("=") for item in cross or []]
    bad = [source for source, equals, root in pairs if not (equals and source and root)]
    if bad:
        raise OptionError(f"--cross {' '.join(bad)}: give each release as source=folder, e.g. agiqa-1k=data/AGIQA-1K")
    across = {source: root for source, _, root in pairs}
    options = {"splits": splits, "variants": variants, "targets": targets, "together": together}
    if configs:
        if not across:
            raise OptionError("--configs fills the rows of a --cross matrix: give --cross source=folder ...")
        name = name or time.strftime("benchmark-%Y%m%d-%H%M%S")
        cross_benchmark(fit_args, configs, across, output=output or name, name=name, **options)
        return
    Benchmark(fit_args, output=output, name=name, cross=across, **options).run()


def score(
    model: str,
    inputs: list[str],
    out: str,
    image_column: str = "image",
    prompt_column: str = "prompt",
    image_root: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    precision: Literal["32", "bf16", "16"] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    revision: str | None = None,
    compile: bool = False,
    features: bool = False,
    cache_dir: str | None = None,
) -> None:
    """Score images with a saved model, on the MOS scale of the data it was trained on.

    Rows go to the file in input order: image, prompt (prompt head), score, error. An image that cannot be read gets
    an empty score and the reason in the error column; every other image is still scored, and the command fails
    (exit status 1) only when none could be. An input that does not exist stops the command before the model
    loads. Under torchrun, srun or fabric run, each process launched scores its share: --devices and --num_nodes
    default to the processes per node and the nodes launched.

    Args:
        model: saved model folder, Hugging Face Hub repo id, or Lightning .ckpt
        inputs: image files, folders (searched recursively), .txt lists of paths (one per line), or tables (.csv,
            .tsv, .jsonl, .parquet, .xlsx) with an image column and, for the prompt head, a prompt column
        out: output file: .csv, .jsonl or .parquet
        image_column: image path column of a table
        prompt_column: prompt column of a table (read for the prompt head only)
        image_root: folder that relative image paths of tables and .txt lists refer to (null: the table's or
            list's own folder)
        batch_size: images per forward pass and device (null: 8 on a CPU, 256 on a GPU)
        num_workers: processes decoding images, per device (null: 1 on a CPU, else the CPU cores per device, at
            most 8)
        accelerator: cpu, gpu, ... (auto: the GPU when there is one)
        devices: devices per node; each scores its share of the images (under a launcher: the processes it
            started per node)
        num_nodes: machines; the output file must be on a file system every node sees (under a launcher: the
            nodes it started)
        precision: compute precision of the towers (null: bf16 on a GPU, else 32; on a CPU with bf16 matrix units
            (AMX), bf16 is much faster, with scores slightly off float32's: see docs/PERFORMANCE.md)
        resume: go on with a job that was stopped (killed, out of time): score only the images its partial output
            lacks, then write the whole file; run the same command with --resume true
        overwrite: replace --out if it exists (without --resume, an existing file is never replaced)
        revision: branch, tag or commit of a hub model
        compile: compile the image towers first (torch.compile, which takes a while before the first batch): faster
            towers, which pays on large jobs where decoding keeps up (docs/PERFORMANCE.md)
        features: use the feature cache, as training does: images whose two embeddings it holds (same towers,
            preprocessing, precision and file) are neither decoded nor encoded again, and the embeddings computed
            are stored for later jobs and fits
        cache_dir: the feature cache folder (null: $MST_CLIPIQA_FEATURES, else ~/.cache/mst_clipiqa/features)
    """
    if Path(out).suffix.lower() not in FORMATS:
        raise OptionError(f"--out {out}: the extension picks the format; use {', '.join(FORMATS)}")
    missing = [given for given in inputs if not Path(given).exists()]
    if missing:
        raise FileNotFoundError(f"no such image, folder, list or table: {', '.join(missing)}")
    if not resume and not overwrite and Path(out).exists():
        raise OptionError(f"--out {out} exists (an earlier job's scores): --overwrite true replaces it, --resume true "
                          "completes it if that job was stopped")  # fmt: skip
    if image_root is not None and not Path(image_root).is_dir():
        raise FileNotFoundError(f"--image_root {image_root}: no such folder")
    from mst_clipiqa.scoring.scorer import score_files

    score_files(
        model,
        inputs,
        out,
        image_column=image_column,
        prompt_column=prompt_column,
        image_root=image_root,
        batch_size=batch_size,
        num_workers=num_workers,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        precision=precision,
        resume=resume,
        revision=revision,
        compile=compile,
        features=features,
        cache_dir=cache_dir,
    )


def serve(
    model: str,
    port: int = 8000,
    host: Literal["127.0.0.1", "0.0.0.0", "::"] = "127.0.0.1",
    accelerator: str = "auto",
    devices: int | str = "auto",
    workers_per_device: int = 1,
    max_batch_size: int = 32,
    batch_timeout: float = 0.01,
    precision: Literal["32", "bf16", "16"] | None = None,
    api_key: str | None = None,
    image_root: str | None = None,
    max_images: int = 256,
    max_request_mb: float = 64,
    timeout: float = 60,
    revision: str | None = None,
    name: str | None = None,
) -> None:
    """Serve a saved model's scores over HTTP (LitServe): batched across requests, on every device given.

    POST /predict with {"images": [base64, ...], "prompts": [...]} (or a multipart upload of "image" files and
    "prompt" fields) answers {"model", "mos_range", "scores", "coarse_share"}, one score per image in order, as
    `score` would give for the same bytes. A request that cannot be scored (a broken image, a missing prompt, too
    large) gets a 4xx naming the image at fault. GET /health says when the workers are ready; /docs is the API page.
    Stops on SIGTERM or Ctrl-C. Needs the serve extra: pip install 'mst-clipiqa[serve]'.

    Args:
        model: saved model folder, Hugging Face Hub repo id, or Lightning .ckpt
        port: TCP port to listen on
        host: 127.0.0.1 (this machine only) or 0.0.0.0 / :: (every interface: set an API key)
        accelerator: cpu, cuda (gpu), mps (auto: the GPU when there is one)
        devices: GPUs to serve on, each with its own workers (auto: all)
        workers_per_device: model copies per device; on a CPU they share its cores
        max_batch_size: requests LitServe gathers into one batch (their images are scored together)
        batch_timeout: seconds a batch waits for more requests
        precision: compute precision of the towers (null: bf16 on a GPU, else 32), as in `score`
        api_key: the key requests must send as the X-API-Key header (null: $MST_CLIPIQA_API_KEY, else none)
        image_root: a folder on this machine whose images requests may name by path ({"paths": [...]}, relative to
            it); nothing outside it is read, symlinks and .. included (null: no paths)
        max_images: images one request may carry
        max_request_mb: largest request body (and file read by path), in MiB
        timeout: seconds a request may wait for a worker before a 504
        revision: branch, tag or commit of a hub model
        name: the model's name in the answers (null: the folder's or file's name, or the hub id)
    """
    options = dict(locals())
    from mst_clipiqa.scoring.serve import serve as run_server

    run_server(options.pop("model"), **options)


def export(ckpt_path: str, out: str, overwrite: bool = False) -> None:
    """Turn a checkpoint into a shareable model folder: config, weights (no pickle), model card.

    Args:
        ckpt_path: checkpoint written by `mst-clipiqa fit` (best-epochNN.ckpt or last.ckpt)
        out: folder to write; `mst-clipiqa score` and `load_scorer` read it
        overwrite: replace the folder if it exists (the new one is written beside it, then renamed into place)
    """
    from mst_clipiqa.hub.pretrained import export_main

    export_main(ckpt_path, out, overwrite)


def push(model: str, repo: str, private: bool | None = None, message: str = "Upload MST-CLIPIQA model") -> None:
    """Upload a saved model folder to a Hugging Face Hub model repo, with its card and encoders.

    Needs a write token (`hf auth login`, or HF_TOKEN). The repo is created if missing.

    Args:
        model: saved model folder (from `mst-clipiqa export` or `save_pretrained`)
        repo: hub repo id: user/name or org/name
        private: create the repo private (null: the hub's default, or the existing repo's setting)
        message: commit message
    """
    from mst_clipiqa.hub.pretrained import push_to_hub

    if not Path(model).is_dir():
        raise FileNotFoundError(f"no such model folder: {model} (export a checkpoint first: {PROG} export --help)")
    print(f"pushed {model} to {repo}: {push_to_hub(model, repo, private=private, commit_message=message)}")


def demo(fit_args: list[str], workdir: str = "demo_run", scenes: int = 40) -> None:
    """Run the whole pipeline offline in minutes on a CPU: draw a small data set, fit, test.

    The data set is drawn in AGIQA-3K's layout and the two CLIP encoders are tiny and random: the printed SRCC and
    PLCC show that every stage runs, not a quality model. Every other option (--trainer.max_epochs, ...) goes to the
    fit, as in `mst-clipiqa fit`.

    Args:
        fit_args: options of `mst-clipiqa fit`, after the demo's config.
        workdir: where the data, encoders and runs go
        scenes: scenes to draw, each at 5 distortion levels
    """
    from mst_clipiqa.demo.run import run

    results = run(workdir, fit_args, scenes)
    print(
        f"demo test: SRCC {results['test/srcc']:.4f}  PLCC {results['test/plcc']:.4f}  "
        f"(tiny random encoders: a smoke test, not a quality model)"
    )


COMMANDS: dict[str, Callable[..., None]] = {
    "benchmark": benchmark,
    "score": score,
    "serve": serve,
    "export": export,
    "push": push,
    "demo": demo,
}
"""Commands beyond the Trainer's. A first parameter `fit_args` receives every option the command does not declare."""
POSITIONAL = {"score": ("model", "inputs"), "serve": ("model",), "push": ("model", "repo")}
PASSES_ON = "fit_args"


def overview() -> str:
    """The top-level help: every command with its line."""
    lines = [*TRAINER_COMMANDS.items(), *((name, _summary(command)) for name, command in COMMANDS.items())]
    width = max(len(name) for name, _ in lines)
    listing = "\n".join(f"  {name.ljust(width)}  {line}" for name, line in lines)
    return (
        f"usage: {PROG} COMMAND [options]\n\n"
        "Train and use MST-CLIPIQA quality models for AI-generated images.\n\n"
        f"commands:\n{listing}\n\n"
        f"`{PROG} COMMAND --help` lists a command's options. Options are written --name value (--batch_size 8,\n"
        "--trainer.max_epochs 10, --compile true); --config FILE.yaml reads them from a file, and a run's saved\n"
        "config.yaml works as --config for every command.\n\n"
        f"{DEBUG_FLAG} anywhere on the command line, or {DEBUG_ENV}=1: a full traceback instead of a one-line error.\n"
    )


def _summary(command: Callable) -> str:
    first = inspect.getdoc(command).split("\n", 1)[0].rstrip(".")
    return first[0].lower() + first[1:]


# ---- parsing -----------------------------------------------------------------------------------------------------


def command_parser(name: str) -> ArgumentParser:
    """The parser of `COMMANDS[name]`: an option per parameter, typed and documented by its signature and docstring
    (a list is given as values in a row: --variants template prompt)."""
    from docstring_parser import parse
    from jsonargparse import ActionConfigFile, ArgumentParser

    class CommandParser(SuggestingErrors, ArgumentParser):  # here, so that the overview needs no jsonargparse
        pass

    command = COMMANDS[name]
    docstring = parse(inspect.getdoc(command))
    helps = {param.arg_name: param.description for param in docstring.params}
    hints = typing.get_type_hints(command)
    parameters = dict(inspect.signature(command).parameters)
    passes_on = parameters.pop(PASSES_ON, None) is not None
    parser = CommandParser(
        prog=f"{PROG} {name}",
        description=" ".join(filter(None, (docstring.short_description, docstring.long_description))),
        exit_on_error=False,
    )
    if not passes_on:
        parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    for key, parameter in parameters.items():
        hint, options = hints[key], {"help": helps[key]}
        element = _list_element(hint)
        if element is None:
            options["type"] = hint
        else:
            options |= {"type": element, "nargs": "+", "metavar": key.upper()}
        if parameter.default is not inspect.Parameter.empty:
            options["default"] = parameter.default
        if key in POSITIONAL.get(name, ()):
            parser.add_argument(key, **options)
        else:
            parser.add_argument(f"--{key}", required=parameter.default is inspect.Parameter.empty, **options)
    return parser


def _list_element(hint: Any) -> Any:
    """The element type of ``list[X]`` or ``list[X] | None``, else None."""
    for option in (hint, *typing.get_args(hint)):
        if typing.get_origin(option) is list:
            return typing.get_args(option)[0]
    return None


def split_own_options(parser: ArgumentParser, argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`argv` parted into the options `parser` declares, with their values, and all the others, in order."""
    own: list[str] = []
    others: list[str] = []
    side = others
    for arg in argv:
        if arg.startswith("-") and not _is_number(arg):
            side = own if arg.split("=", 1)[0] in option_actions(parser) else others
        side.append(arg)
    return own, others


def _is_number(arg: str) -> bool:
    try:
        float(arg)
    except ValueError:
        return False
    return True


def refuse_run_config(command: str, argv: Sequence[str]) -> None:
    """A training run's config.yaml given to score or export: say what the command takes instead, naming that run's
    checkpoints, rather than fail on its every key."""
    for path, config in read_configs(argv):  # an unreadable one is the parser's to report
        if isinstance(config, dict) and "trainer" in config:
            checkpoints = sorted(path.parent.glob("checkpoints/*.ckpt"), key=lambda p: not p.name.startswith("best"))
            example = str(checkpoints[0]) if checkpoints else "RUN/checkpoints/best-epochNN.ckpt"
            takes = {
                "score": f"MODEL, e.g. {PROG} score {example} IMAGES --out scores.csv",
                "export": f"--ckpt_path and --out, e.g. {PROG} export --ckpt_path {example} --out my-model",
                "push": f"MODEL REPO, a folder that {PROG} export wrote and a hub repo id",
            }[command]
            raise OptionError(f"--config {path} configures training (fit, test, ...); {command} takes {takes}")


# ---- running -----------------------------------------------------------------------------------------------------


def main(args: Sequence[str] | None = None) -> None:
    """Run the command line `args` (default: sys.argv[1:]); a user's mistake exits with its one-line report."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    command = argv[0] if argv and argv[0] in (*TRAINER_COMMANDS, *COMMANDS) else ""
    try:
        run(argv)
    except ArgumentError as err:
        if debug:
            raise
        _report(command, err, hint=f"`{_prog(command)} --help` lists the {'options' if command else 'commands'}")
        sys.exit(2)
    except Exception as err:
        if debug or not _is_user_error(err):
            raise
        _report(command, err)
        sys.exit(2 if isinstance(err, OptionError) else 1)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Destroy the process group a command's Trainer started (torchrun, srun, several devices): left to the
    interpreter's exit, its threads can abort a process whose work is done, and the job is reported as failed."""
    distributed = sys.modules.get("torch.distributed")  # imported only where a command used it
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def run(argv: list[str]) -> None:
    """Run `argv`, the command first."""
    if not argv:
        sys.stderr.write(overview())
        sys.exit(2)
    if argv[0] in ("-h", "--help"):
        print(overview(), end="")
        return
    if argv[0] in COMMANDS:
        run_command(argv[0], argv[1:])
        return
    if not argv[0].startswith("-") and argv[0] not in TRAINER_COMMANDS:
        known = [*TRAINER_COMMANDS, *COMMANDS]
        suggestion = did_you_mean(argv[:1], known)
        raise ArgumentError(None, f"no command {argv[0]!r}{suggestion} (the commands: {', '.join(known)})")
    if argv[0] in NEED_WEIGHTS and not weights_maybe_given(argv[1:]):
        raise no_weights(argv[0])  # before the seconds of building the Trainer's parser
    if len(argv) == 2 and argv[1] in ("-h", "--help"):
        print(trainer_help(argv[0]), end="")
        sys.exit(0)  # as argparse does after a help
    from mst_clipiqa.cli.trainer import MSTCLIPIQACLI

    MSTCLIPIQACLI(args=argv)


def weights_maybe_given(argv: Sequence[str]) -> bool:
    """Whether `argv` may give trained weights (--ckpt_path, --model.init_from), itself or in a config file; False
    only where it surely does not. The parse decides the rest (`MSTCLIPIQACLI.parse_arguments`)."""
    options = {arg.split("=", 1)[0] for arg in argv if arg.startswith("-")}
    if options & {"--ckpt_path", "--model.init_from", "--model", "-h", "--help", "--print_config"}:
        return True
    for _, config in read_configs(argv):  # an unreadable one is the parser's to report
        model = config.get("model") if isinstance(config, dict) else None
        if not isinstance(config, dict) or config.get("ckpt_path") or not isinstance(model or {}, dict):
            return True
        if (model or {}).get("init_from"):
            return True
    return False


def trainer_help(command: str) -> str:
    """The help of a Trainer command, from the user's cache (``$XDG_CACHE_HOME/mst_clipiqa/help``, else ~/.cache)
    when this installation rendered it before: rendering builds LightningCLI's parser, which takes seconds. The text
    is keyed by the versions of what writes it, the package's source files and the terminal's width."""
    path = _help_cache() / f"{command}-{_help_key()}.txt"
    try:
        return path.read_text()
    except OSError:
        pass
    import contextlib
    import io

    from mst_clipiqa.cli.trainer import MSTCLIPIQACLI

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            MSTCLIPIQACLI(args=[command, "--help"])
        except SystemExit as exit_info:
            if exit_info.code not in (0, None):
                raise
    text = out.getvalue()
    with contextlib.suppress(OSError):  # a read-only home still gets the help, rendered each time
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        partial.replace(path)
    return text


def _help_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mst_clipiqa" / "help"


def _help_key() -> str:
    import hashlib
    import shutil
    from importlib.metadata import version

    package = Path(__file__).parents[1]
    parts = [sys.version, str(shutil.get_terminal_size().columns)]
    parts += [f"{name}={version(name)}" for name in ("mst-clipiqa", "lightning", "jsonargparse", "torch")]
    parts += [f"{path}:{path.stat().st_mtime_ns}:{path.stat().st_size}" for path in sorted(package.rglob("*.py"))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def run_command(name: str, argv: list[str]) -> None:
    """Parse `argv` with the command's parser and call it; options it does not declare go on to its fits."""
    parser = command_parser(name)
    if PASSES_ON not in inspect.signature(COMMANDS[name]).parameters:
        refuse_run_config(name, argv)
        COMMANDS[name](**_options(parser, argv))
        return
    own, others = split_own_options(parser, argv)
    options = _options(parser, own)
    try:
        COMMANDS[name](others, **options)
    except ArgumentError as err:
        # An option the fit does not know either: a misspelling of one of the command's own reads better as such.
        unknown = re.sub(r"; did you mean .*", "", err.message)
        own_suggestion = explain(unknown, parser)
        if own_suggestion != unknown:
            raise ArgumentError(None, own_suggestion) from err
        raise


def _options(parser: ArgumentParser, argv: list[str]) -> dict[str, Any]:
    options = parser.parse_args(argv).as_dict()
    options.pop("config", None)
    return options


def _is_user_error(err: BaseException) -> bool:
    if isinstance(err, USER_ERRORS):
        return True
    lightning_errors = sys.modules.get("lightning.fabric.utilities.exceptions")
    return lightning_errors is not None and isinstance(err, lightning_errors.MisconfigurationException)


def _report(command: str, err: BaseException, hint: str = "") -> None:
    """Print `err` as "mst-clipiqa COMMAND: error: ...". Under several processes (DDP), rank 0 prints all of it and
    every other rank its first line, so that an error every rank meets reads once and one rank's own is not lost."""
    prog = _prog(command)
    lines = (str(err) if not isinstance(err, ArgumentError) else err.message).strip().splitlines() or [repr(err)]
    rank = _rank()
    if rank:
        print(f"{prog}: error (rank {rank}): {lines[0]}", file=sys.stderr)
        return
    print(f"{prog}: error: " + "\n".join(lines), file=sys.stderr)
    if hint:
        print(hint, file=sys.stderr)


def _prog(command: str) -> str:
    return f"{PROG} {command}" if command else PROG


def _rank() -> int:
    """This process's global rank, from the variables Lightning reads (torchrun, its own launcher, SLURM, LSF)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


if __name__ == "__main__":
    main()
