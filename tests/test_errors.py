"""A user's mistakes, made as a user makes them (the `mst-clipiqa` console script, real files): each ends in one
message whose first line names the culprit, exit status 2 for a usage error and 1 for the rest, and no traceback
unless --debug asks for one. And the help answers at once."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from scripts.runs import cli_args, subprocess_env

from mst_clipiqa.cli.commands import main

ROOT = Path(__file__).parents[1]
CONSOLE = shutil.which("mst-clipiqa", path=str(Path(sys.executable).parent))
COMMANDS = ("fit", "validate", "test", "predict", "benchmark", "score", "serve", "export", "push", "demo")


@dataclass
class Mistake:
    args: list[str]
    status: int
    """2 for a usage error, 1 for the rest."""
    culprit: tuple[str, ...]
    """What the error's first line names."""
    details: tuple[str, ...] = ()
    """What the lines after it name."""


def mistakes(tiny_clip: tuple[str, str], demo_data: str, tmp: Path) -> dict[str, Mistake]:
    """Every mistake, with the files it needs written under `tmp`."""
    images = str(Path(demo_data) / "images")
    (tmp / "damaged-model").mkdir()
    (tmp / "damaged-model" / "config.json").write_text("{not json")
    (tmp / "damaged.ckpt").write_bytes(b"PK\x03\x04 half of a checkpoint")
    (tmp / "annotations.csv").write_text("image,mos\nimages/a.png,3.5\n")  # the config maps columns file and score
    bad_data = tmp / "bad-data"
    bad_data.mkdir()
    (bad_data / "images").symlink_to(images)
    rows = (Path(demo_data) / "data.csv").read_text().splitlines()
    (bad_data / "data.csv").write_text("\n".join([*rows, "missing.jpg" + rows[1][rows[1].index(",") :]]) + "\n")
    tiny = ["--model.net.coarse_encoder", tiny_clip[0], "--model.net.fine_encoder", tiny_clip[1]]
    runs = tmp / "runs"
    inhouse, table = str(ROOT / "experiments" / "inhouse_table.yaml"), str(tmp / "annotations.csv")
    score = ["score", "my-model", images, "--out"]
    return {
        "unknown command": Mistake(["fti", "--config", "x.yaml"], 2, ("'fti'", "did you mean fit?")),
        "misspelled option": Mistake([*score, "s.csv", "--batch-size", "2"], 2, ("--batch-size", "--batch_size?")),
        "shortened option": Mistake([*score, "s.csv", "--batch", "2"], 2, ("--batch", "--batch_size?")),
        "bad choice": Mistake([*score, "s.csv", "--precision", "bf61"], 2, ("--precision", "'bf61'", "bf16?")),
        "bad output extension": Mistake([*score, "s.txt"], 2, ("--out s.txt", ".csv")),
        "a training config for score": Mistake(
            ["score", "--config", str(ROOT / "experiments" / "demo.yaml")], 2, ("demo.yaml", "MODEL")
        ),
        "missing input folder": Mistake(["score", "my-model", str(tmp / "no-pics"), "--out", "s.csv"], 1, ("no-pics",)),
        # These load Lightning and the model.
        "missing config file": Mistake(["fit", "--config", str(tmp / "experiment.yaml")], 2, ("experiment.yaml",)),
        "shortened trainer option": Mistake(
            ["fit", *cli_args(demo_data, tiny_clip, runs, "--trainer.max_epoch", "1")],
            2,
            ("--trainer.max_epoch 1", "did you mean --trainer.max_epochs?"),
        ),
        "no trained weights": Mistake(
            ["predict", *cli_args(demo_data, tiny_clip, tmp / "predictions")],
            2,
            ("predict needs trained weights", "--ckpt_path", "--model.init_from"),
        ),
        "mistyped encoder folder": Mistake(
            ["fit", *cli_args(demo_data, tiny_clip, runs, "--model.net.fine_encoder", str(tmp / "tiny-clip-b61"))],
            1,
            ("model.net.fine_encoder", "tiny-clip-b61", "no such folder"),
        ),
        "missing data root": Mistake(
            ["fit", *cli_args(demo_data, tiny_clip, runs, "--data.root", str(tmp / "AGIQA-3K"))],
            1,
            ("data.root", "AGIQA-3K", "--data.root"),
        ),
        "wrong column": Mistake(
            ["fit", "--config", inhouse, "--data.root", table, *tiny, "--trainer.default_root_dir", str(runs)],
            1,
            ("annotations.csv", "score"),
        ),
        "bad data": Mistake(["fit", *cli_args(str(bad_data), tiny_clip, runs)], 1, ("data.csv",), ("missing.jpg",)),
        "missing model": Mistake(["score", str(tmp / "no-model"), images, "--out", "s.csv"], 1, ("no-model",)),
        "damaged model": Mistake(["score", str(tmp / "damaged-model"), images, "--out", "s.csv"], 1, ("config.json",)),
        "damaged checkpoint (test)": Mistake(
            ["test", *cli_args(demo_data, tiny_clip, runs, "--ckpt_path", str(tmp / "damaged.ckpt"))],
            1,
            ("damaged.ckpt",),
        ),
        "damaged checkpoint (export)": Mistake(
            ["export", "--ckpt_path", str(tmp / "damaged.ckpt"), "--out", str(tmp / "model")], 1, ("damaged.ckpt",)
        ),
    }


def console(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CONSOLE, *args], env=env or subprocess_env(), capture_output=True, text=True, timeout=300
    )  # fmt: skip


def error_line(stderr: str) -> str:
    """The first line of the error report (Lightning may log a few lines before it)."""
    return next((line for line in stderr.splitlines() if line.startswith("mst-clipiqa") and ": error" in line), "")


def in_this_process(args: list[str]) -> subprocess.CompletedProcess:
    """`main(args)` in this process, as the console script runs it: its exit status and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(args)
            status = 0
        except SystemExit as exit_info:
            status = exit_info.code
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


IN_REAL_PROCESSES = ("unknown command", "missing input folder", "bad data")
"""The mistakes made with the console script, one of each kind of journey: a usage error and another error before
any heavy import, and an error of a Trainer command, which imports torch and Lightning (and Lightning logs before the
error). The others call `main` in this process: a process of its own would add seconds of imports to each, and
nothing to what its message is checked for."""


@pytest.fixture(scope="module")
def made(tiny_clip, demo_data, tmp_path_factory) -> dict[str, tuple[Mistake, subprocess.CompletedProcess]]:
    """Every mistake made: those of `IN_REAL_PROCESSES` two at a time (most of their time goes to importing torch and
    Lightning), meanwhile the others in this process."""
    tmp = tmp_path_factory.mktemp("mistakes")
    cases = mistakes(tiny_clip, demo_data, tmp)
    with ThreadPoolExecutor(2) as pool:
        real = {name: pool.submit(console, *cases[name].args) for name in IN_REAL_PROCESSES}
        done = {name: in_this_process(case.args) for name, case in cases.items() if name not in real}
        done.update({name: result.result() for name, result in real.items()})
    return {name: (case, done[name]) for name, case in cases.items()}


@pytest.mark.parametrize(
    "name",
    ["unknown command", "misspelled option", "shortened option", "shortened trainer option", "no trained weights",
     "bad choice", "bad output extension", "a training config for score",
     "missing input folder", "missing config file", "mistyped encoder folder", "missing data root", "wrong column",
     "bad data", "missing model",
     "damaged model", "damaged checkpoint (test)", "damaged checkpoint (export)"],
)  # fmt: skip
def test_a_mistake_ends_in_one_message_that_names_the_culprit(made, name):
    mistake, result = made[name]
    said = f"{mistake.args[:3]} said:\n{result.stderr[-3000:]}"
    assert result.returncode == mistake.status, said
    assert "Traceback" not in result.stderr, said
    first = error_line(result.stderr)
    assert all(part in first for part in mistake.culprit), said
    assert all(part in result.stderr[result.stderr.index(first) :] for part in mistake.details), said
    assert first.startswith(f"mst-clipiqa{' ' + mistake.args[0] if mistake.args[0] in COMMANDS else ''}: error: ")


@pytest.mark.parametrize("command", ["validate", "test"])
def test_evaluating_without_trained_weights_stops_before_writing_anything(command, tiny_clip, demo_data, tmp_path):
    """(predict is among the mistakes above.) An untrained head's metrics would look like a model's."""
    result = in_this_process([command, *cli_args(demo_data, tiny_clip, tmp_path / "runs")])
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_line(result.stderr).startswith(f"mst-clipiqa {command}: error: {command} needs trained weights")
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback(made):
    mistake, _ = made["bad output extension"]
    for debug, env in ((["--debug"], None), ([], subprocess_env(MST_CLIPIQA_DEBUG="1"))):
        result = console(*mistake.args, *debug, env=env)
        assert result.returncode == 1 and "Traceback" in result.stderr and "OptionError: --out s.txt" in result.stderr
    result = console("fti", "--debug")
    assert "Traceback" in result.stderr and "ArgumentError" in result.stderr


def test_under_several_processes_rank_0_reports_all_and_the_others_their_first_line(monkeypatch, capsys):
    bad_extension = ["score", "my-model", "images", "--out", "s.txt"]
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(["fti"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "mst-clipiqa: error (rank 1): no command 'fti'; did you mean fit? (the commands: " + ", ".join(COMMANDS) + ")"
    ]
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        main(bad_extension)
    assert capsys.readouterr().err.splitlines() == [
        "mst-clipiqa score: error: --out s.txt: the extension picks the format; use .csv, .jsonl, .parquet"
    ]


# ---- the help ----------------------------------------------------------------------------------------------------


def imported(args: list[str], env: dict[str, str] | None = None) -> set[str]:
    """The modules `python -m mst_clipiqa ARGS` imports."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mst_clipiqa", *args], env=env or subprocess_env(),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    return set(lines[1:])  # the first is the header


def test_the_overview_lists_every_command_with_one_line():
    result = console("--help")
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)
    assert "--debug" in result.stdout and "MST_CLIPIQA_DEBUG" in result.stdout
    bare = console()
    assert bare.returncode == 2 and bare.stderr == result.stdout


@pytest.mark.parametrize("args", [["--help"], ["score", "--help"], ["export", "--help"]])
def test_the_help_answers_without_torch_or_lightning(args):
    """Its time is measured by perf/help_time.py; here, that it imports none of the heavy libraries."""
    heavy = {name for name in imported(args) if name.split(".")[0] in ("torch", "lightning", "transformers")}
    assert not heavy, sorted(heavy)[:10]


def test_a_trainer_commands_help_is_rendered_once_then_read_back_without_lightning(tmp_path):
    env = subprocess_env(XDG_CACHE_HOME=str(tmp_path))
    first = console("fit", "--help", env=env)
    assert first.returncode == 0 and "--model.net.variant" in first.stdout, first.stderr[-2000:]
    assert len(list((tmp_path / "mst_clipiqa" / "help").glob("fit-*.txt"))) == 1
    heavy = {name for name in imported(["fit", "--help"], env) if name.split(".")[0] in ("torch", "lightning")}
    assert not heavy, sorted(heavy)[:10]
    again = console("fit", "--help", env=env)
    assert (again.returncode, again.stdout) == (0, first.stdout)
