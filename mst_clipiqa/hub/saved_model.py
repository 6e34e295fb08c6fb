"""`SavedModel`, the shareable model format: a folder, local or a Hugging Face Hub repo, of config.json (the network's
settings, MOS range, encoders and training record), model.safetensors (the trainable weights only), README.md (the
model card) and encoders/ (copies of local CLIP encoders). Hub encoders are recorded by id and commit, not copied, so
the towers are exactly those the head was trained on. Nothing is pickled and no code is fetched.

`SavedModel.read` also reads a Lightning checkpoint of `MSTCLIPIQAModule`, so a `.ckpt` can be scored, exported or
fine-tuned from like a saved folder.
"""

from __future__ import annotations

import csv
import filecmp
import json
import math
import shutil
import warnings
from contextlib import suppress
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import lightning as L
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from mst_clipiqa import __version__
from mst_clipiqa.data.features import TOKENIZER_FILES
from mst_clipiqa.data.splits import split_settings
from mst_clipiqa.errors import BadCheckpointError, BadModelError, OptionError
from mst_clipiqa.model import INTERNAL_HIGH, INTERNAL_LOW, MSTCLIPIQA, ModelConfig
from mst_clipiqa.training.checkpoints import read_checkpoint

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
ENCODERS = "encoders"
"""Sub-folder holding copies of local encoders, one folder per stream."""
FORMAT = "mst-clipiqa"
FORMAT_VERSION = 2
"""Bump when the folder's layout changes in a way older readers would misread."""

TRAINABLE = MSTCLIPIQA.TRAINABLE
STREAMS = ("coarse", "fine")
"""The two image streams; the coarse encoder also supplies the text tower, tokenizer and preprocessing."""

ENCODER_FILES = (CONFIG_NAME, "preprocessor_config.json", "added_tokens.json", *TOKENIZER_FILES)
"""What loading a CLIP checkpoint reads besides its weights (towers, tokenizer, preprocessing), where present."""
SAFETENSORS_FILES = ("*.safetensors", "model.safetensors.index.json")
PYTORCH_FILES = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
"""Weights in PyTorch's format, read only where a checkpoint has no safetensors (as transformers does)."""

MUST_MATCH = ("coarse_encoder", "fine_encoder", "revision", "variant", "fusion_dim")
"""Settings that give the trainable weights their shape or meaning (with the head's, `MUST_MATCH_HEAD`)."""
MUST_MATCH_HEAD = {"template": ("template",), "prompt": ("num_heads", "head_hidden")}

MOS_RANGE_KEY = "net.mos_range"
"""The MOS scale in a checkpoint's state dict; older checkpoints hold it as `LEGACY_MOS_RANGE_KEY`."""
LEGACY_MOS_RANGE_KEY = "mos_range"
FINE_TUNED_FROM = "fine_tuned_from"
"""The key naming the saved model a fit started from, in a checkpoint and in config.json's training record."""


@dataclass
class SavedModel:
    """What a saved model holds, wherever it was read from."""

    net: ModelConfig
    """The network's configuration; a copied encoder is named by its path on this machine."""
    mos_range: tuple[float, float]
    """(low, high) of the MOS scale the head's internal 1..5 maps onto."""
    weights: dict[str, Tensor]
    """Trainable weights, keyed as in `MSTCLIPIQA.state_dict()` (``fusion.*``, ``head.*``)."""
    package_version: str = __version__
    source: str = ""
    """Where it was read from, for messages."""
    commits: dict[str, str] = field(default_factory=dict)
    """Hub commit of each stream's encoder named by hub id, where known."""
    training: dict[str, Any] = field(default_factory=dict)
    """What is known of its training, for the model card: "data", "checkpoint", "validation", "test"."""

    # ---- writing -------------------------------------------------------------------------------------------------

    @classmethod
    def of(cls, model: L.LightningModule | MSTCLIPIQA, mos_range: tuple[float, float] | None = None) -> SavedModel:
        """The saved form of a LightningModule holding the network as `net` (with what its Trainer knew of its data
        and metrics) or of a bare network. `mos_range` overrides the network's; a bare network never trained keeps
        the internal 1..5 scale."""
        if isinstance(model, MSTCLIPIQA):
            net, training = model, {}
            if not net.has_mos_range:
                mos_range = mos_range or (INTERNAL_LOW, INTERNAL_HIGH)
        else:
            net, training = model.net, _training_of_module(model)
            if not net.has_mos_range and mos_range is None:
                raise ValueError("the model has no MOS range yet: train it first, or pass mos_range=(low, high)")
        mos_range = mos_range or tuple(net.mos_range.tolist())
        weights = {key: value.detach().cpu().contiguous() for key, value in net.saved_state().items()}
        del weights["mos_range"]  # config.json holds it
        return cls(net.config, _checked_range(mos_range, "mos_range"), weights, training=training)

    def save(self, folder: str | Path) -> Path:
        """Write the model to `folder` (created if needed), with copies of local encoders. Returns the folder.

        Raises:
            BadModelError: an encoder that is neither a folder nor found in the Hugging Face cache or on the hub.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        encoders = self._place_encoders(folder)
        portable = {f"{stream}_encoder": entry.get("hub_id") or entry["folder"] for stream, entry in encoders.items()}
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "package_version": self.package_version,
            "variant": self.net.variant,
            "mos_range": list(self.mos_range),
            "net": asdict(replace(self.net, **portable)),
            "encoders": encoders,
            "training": self.training,
        }
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        # safetensors' save_file creates its file with mode 0600; the same bytes written here get the usual mode.
        (folder / WEIGHTS_NAME).write_bytes(safetensors_bytes(self.weights, metadata={"format": "pt"}))
        (folder / CARD_NAME).write_text(model_card(self, encoders, folder.resolve().name))
        return folder

    def _place_encoders(self, folder: Path) -> dict[str, dict[str, str | None]]:
        """Each stream's entry of config.json: {"hub_id", "commit"} for a hub encoder (or a folder of the Hugging Face
        cache), {"folder"} for a local encoder, copied into `folder` once. Copies no stream uses any more go."""
        entries: dict[str, dict[str, str | None]] = {}
        copies: dict[Path, str] = {}  # resolved source → its folder relative to the model's
        for stream in STREAMS:
            name = getattr(self.net, f"{stream}_encoder")
            local = Path(name).expanduser()
            if origin := _hub_origin(name):
                entries[stream] = {"hub_id": origin[0], "commit": origin[1]}
            elif local.is_dir():
                source = local.resolve()
                if source == folder.resolve():
                    raise BadModelError(f"cannot save into {folder}: it is the {stream} encoder's own folder")
                if source not in copies:
                    copies[source] = f"{ENCODERS}/{stream}"
                    _copy_encoder(source, folder / copies[source], stream)
                entries[stream] = {"folder": copies[source]}
            elif _looks_like_path(name):
                raise BadModelError(f"the {stream} encoder {_where(name)} does not exist")
            else:
                commit = self.commits.get(stream) or hub_commit(name, self.net.revision, stream)
                entries[stream] = {"hub_id": name, "commit": commit}
        for stream in STREAMS:
            stale = folder / ENCODERS / stream
            if f"{ENCODERS}/{stream}" not in copies.values() and stale.is_dir():
                shutil.rmtree(stale)
        return entries

    # ---- reading -------------------------------------------------------------------------------------------------

    @classmethod
    def read(cls, source: str | Path, revision: str | None = None) -> SavedModel:
        """Read a saved folder, a Lightning `.ckpt` file, or a hub repo id (`revision`: its branch, tag or commit).

        Raises:
            FileNotFoundError: a local path that does not exist.
            BadModelError: a folder that is not a complete MST-CLIPIQA model: config.json or the weights missing or
                damaged, a copied encoder missing.
            BadCheckpointError: a checkpoint that is damaged or not one of an MST-CLIPIQA model.
        """
        path = Path(source).expanduser()
        if path.is_file():
            return cls._read_checkpoint(path)
        if path.is_dir():
            return cls._read_folder(path)
        if _looks_like_path(str(source)):
            raise FileNotFoundError(f"no such model folder or checkpoint: {_where(str(source))}")
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(
                str(source), revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, f"{ENCODERS}/*"]
            )
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"no such model folder or checkpoint: {_where(str(source))}; nor is it a model on the Hugging Face "
                f"Hub: {_hub_failure(err)}"
            ) from err
        saved = cls._read_folder(Path(folder))
        saved.source = str(source)
        return saved

    @classmethod
    def _read_folder(cls, folder: Path) -> SavedModel:
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise BadModelError(f"{folder} holds no {CONFIG_NAME}: not a saved MST-CLIPIQA model")
        _check_readable(config_path)
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise BadModelError(f"{config_path} is damaged ({err}): save or export the model again") from err
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise BadModelError(f"{config_path} does not describe an MST-CLIPIQA model")
        if config.get("format_version", 0) > FORMAT_VERSION:
            raise BadModelError(
                f"{folder} was written by mst-clipiqa {config.get('package_version')} in format version "
                f"{config['format_version']}; this version reads up to {FORMAT_VERSION}: upgrade mst-clipiqa"
            )
        try:
            net = _model_config(config["net"], config_path)
            mos_range = _checked_range(config["mos_range"], str(config_path))
            net, commits = _located_encoders(net, config.get("encoders", {}), folder, config_path)
        except (KeyError, TypeError, AttributeError) as err:
            raise BadModelError(f"{config_path} is damaged (at {err}): save or export the model again") from err
        try:
            _check_readable(folder / WEIGHTS_NAME)
            weights = load_file(folder / WEIGHTS_NAME)
        except (OSError, SafetensorError) as err:
            raise BadModelError(
                f"{folder / WEIGHTS_NAME} is missing or damaged ({err}): save or export the model again"
            ) from err
        return cls(
            net=net,
            mos_range=mos_range,
            weights=weights,
            package_version=config.get("package_version", "unknown"),
            source=str(folder),
            commits=commits,
            training=config.get("training", {}),
        )

    @classmethod
    def _read_checkpoint(cls, path: Path) -> SavedModel:
        checkpoint = read_checkpoint(path)
        try:
            net, state = checkpoint["hyper_parameters"]["net"], checkpoint["state_dict"]
            mos_range = state[MOS_RANGE_KEY if MOS_RANGE_KEY in state else LEGACY_MOS_RANGE_KEY].tolist()
        except (KeyError, TypeError) as err:
            raise BadCheckpointError(f"{path} is not a checkpoint of MSTCLIPIQAModule (no {err})") from err
        # Frozen towers, should a checkpoint hold them, come from the config instead.
        prefixes = tuple(f"net.{part}." for part in TRAINABLE)
        weights = {key.removeprefix("net."): value for key, value in state.items() if key.startswith(prefixes)}
        return cls(
            _model_config(net, path),
            _checked_range(mos_range, str(path)),
            weights,
            source=str(path),
            training=_training_of_checkpoint(path, checkpoint),
        )

    # ---- loading into a model --------------------------------------------------------------------------------------

    def loadable_net(self) -> ModelConfig:
        """The network with each hub encoder at its recorded commit, as a folder of the Hugging Face cache (downloaded
        when missing there, unless HF_HUB_OFFLINE is set).

        Raises:
            BadModelError: an encoder that cannot be found, naming where it was looked for.
        """
        names = {}
        for stream in STREAMS:
            name = getattr(self.net, f"{stream}_encoder")
            if stream in self.commits:
                names[f"{stream}_encoder"] = str(_hub_snapshot(name, self.commits[stream], stream))
            elif _looks_like_path(name) and not Path(name).expanduser().is_dir():
                # Never handed to transformers, which would take it for a hub id and try the network.
                raise BadModelError(f"{self.source}: the {stream} encoder {_where(name)} does not exist")
        return replace(self.net, **names)

    def load_into(self, net: MSTCLIPIQA) -> MSTCLIPIQA:
        """Copy the trainable weights and the MOS range into `net`, after checking that it agrees with the saved
        network on what gives the weights their shape or meaning (encoders agree when they load the same checkpoint,
        however named)."""
        names, config = MUST_MATCH + MUST_MATCH_HEAD.get(self.net.variant, ()), net.config
        differ = [name for name in names if not _same_setting(name, getattr(config, name), getattr(self.net, name))]
        if differ:
            lines = "; ".join(f"{n}: saved {getattr(self.net, n)!r}, configured {getattr(config, n)!r}" for n in differ)
            raise OptionError(
                f"cannot start from {self.source or 'the saved model'}: the network differs in {lines}. "
                f"Set the configuration to the saved values, or leave it unset to take them (--model.net.{differ[0]})"
            )
        unexpected = sorted(key for key in self.weights if key.split(".", 1)[0] not in TRAINABLE)
        if unexpected:
            raise BadModelError(f"{self.source}: unexpected weights {', '.join(unexpected[:5])}")
        for part in TRAINABLE:
            prefix = part + "."
            try:
                getattr(net, part).load_state_dict(
                    {key.removeprefix(prefix): value for key, value in self.weights.items() if key.startswith(prefix)}
                )
            except RuntimeError as err:
                raise BadModelError(f"{self.source}: the weights do not fit its network: {err}") from err
        net.set_mos_range(*self.mos_range)
        return net


# ---- the model card --------------------------------------------------------------------------------------------------

TARGET_TEXT = {
    "quality": "perceptual quality",
    "alignment": "text-image alignment (how well it matches its generation prompt)",
    "correspondence": "text-image alignment (how well it matches its generation prompt)",
    "authenticity": "authenticity (how real it looks)",
}
HEAD_TEXT = {
    "template": "template head (A): the fused image feature against five quality templates; no prompt needed",
    "prompt": "prompt-anchored head (B): the image attends to its generation prompt, which scoring needs",
}
STREAM_TEXT = {
    "coarse": "coarse (semantics; also the text tower, tokenizer and preprocessing)",
    "fine": "fine (texture, artifacts)",
}


def model_card(saved: SavedModel, encoders: dict[str, dict[str, str | None]], name: str) -> str:
    """The model card (README.md in the Hugging Face convention) of `saved`, whose encoders config.json records as
    `encoders`; `name` (the folder's) is what the usage examples load it by."""
    from huggingface_hub import ModelCardData

    data = saved.training.get("data", {})
    low, high = saved.mos_range
    base = saved.training.get(FINE_TUNED_FROM)
    hub_ids = [base["hub_id"]] if base and base.get("hub_id") else []
    hub_ids = list(dict.fromkeys([*hub_ids, *(entry["hub_id"] for entry in encoders.values() if entry.get("hub_id"))]))
    hub_data = [data["root"]] if data.get("source") == "hf" and "/" in str(data.get("root")) else None
    metadata = ModelCardData(
        library_name=FORMAT,
        tags=[FORMAT, "image-quality-assessment", "aigc", "clip"],
        base_model=hub_ids or None,
        datasets=hub_data,
    ).to_yaml()
    target = data.get("target")
    what = f"the {TARGET_TEXT[target]} MOS" if target in TARGET_TEXT else "the MOS (target not recorded)"
    bounded = " The template head's scores never leave this range." if saved.net.variant == "template" else ""
    lines = [
        "---", metadata, "---", "",
        f"# {name}", "",
        f"An [MST-CLIPIQA](https://arxiv.org/abs/2606.16799) model: it predicts {what} of an AI-generated image, with "
        f"the {HEAD_TEXT[saved.net.variant]}.", "",
        *(_fine_tuned_text(base) if base else []),
        "## Scale", "",
        f"Scores are on the MOS scale of the training data, from **{low:g}** (low) to **{high:g}** (high): the head's "
        f"internal 1..5 maps linearly onto it.{bounded}", "",
        "## Encoders", "",
        "Two frozen CLIP image towers, one per stream; only the fusion and the head were trained.", "",
        "| stream | encoder | revision |", "|---|---|---|",
    ]  # fmt: skip
    for stream, entry in encoders.items():
        if entry.get("hub_id"):
            where = f"[`{entry['hub_id']}`](https://huggingface.co/{entry['hub_id']})"
            revision = f"`{entry['commit']}`" if entry.get("commit") else "not recorded"
            lines.append(f"| {STREAM_TEXT[stream]} | {where} | {revision} |")
        else:
            lines.append(f"| {STREAM_TEXT[stream]} | `{entry['folder']}/`, a copy of a local checkpoint | |")
    lines += ["", "## Training data", ""]
    if data:
        lines += ["| setting | value |", "|---|---|", *(f"| {key} | `{value}` |" for key, value in data.items())]
    else:
        lines.append("Not recorded: the model was saved without its data module.")
    lines += ["", "## Metrics", "", *_metrics_text(saved.training), "", "## Usage", ""]
    lines += _usage_text(name, saved.net.variant)
    return "\n".join(lines) + "\n"


def _fine_tuned_text(base: dict[str, str]) -> list[str]:
    """The card's line on the saved model a fit started from (`FINE_TUNED_FROM`)."""
    if base.get("hub_id"):
        where = f"[`{base['hub_id']}`](https://huggingface.co/{base['hub_id']})"
    else:
        where = f"`{base['name']}`, a local model (not published)"
    return [f"Fine-tuned from {where}: its weights were the starting point of this model's training.", ""]


def _metrics_text(training: dict[str, Any]) -> list[str]:
    lines = []
    if checkpoint := training.get("checkpoint"):
        lines.append(f"- Weights of `{checkpoint['file']}` (epoch {checkpoint['epoch']}, step {checkpoint['step']}).")
    if validation := training.get("validation"):
        lines.append(
            f"- Best validation `{validation['monitor']}` of the run: {validation['best']:.4f} "
            f"(`{validation['best_checkpoint']}`)."
        )
    if test := training.get("test"):
        if not test["of_these_weights"]:
            title = f"Test metrics logged in the training run's folder `{test['run']}` (it does not record which "
            title += "checkpoint it tested)"
        else:
            title = "Test metrics of these weights" + (f" (`test` run in `{test['run']}`)" if test.get("run") else "")
        lines += ["", f"{title}:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {metric} | {value:.4f} |" for metric, value in test["metrics"].items()]
    elif lines:
        lines.append("- The run logged no test metrics.")
    return lines or ["Not recorded."]


def _usage_text(name: str, variant: str) -> list[str]:
    if variant == "template":
        python = 'scores = scorer.score(["a.png", "b.jpg"])'
        command = ["```bash", f"mst-clipiqa score {name} images/ --out scores.csv", "```", ""]
    else:
        python = 'scores = scorer.score(["a.png", "b.jpg"], prompts=["a red cube", "two cats"])'
        command = ["From the command line, give a table of images and their prompts (`mst-clipiqa score --help`).", ""]
    return [
        f"With the `mst-clipiqa` package installed; `{name}` is this folder, or its Hub repo id once pushed.", "",
        *command,
        "```python", "from mst_clipiqa import load_scorer", "", f'scorer = load_scorer("{name}")', python, "```", "",
        "Scores come back on the scale above.",
    ]  # fmt: skip


# ---- what the training knew ------------------------------------------------------------------------------------------


def _training_of_checkpoint(path: Path, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What a Lightning checkpoint and its run folder tell of its training (`SavedModel.training`)."""
    training: dict[str, Any] = {
        "checkpoint": {"file": path.name, "epoch": checkpoint.get("epoch"), "step": checkpoint.get("global_step")}
    }
    if isinstance(data := checkpoint.get("datamodule_hyper_parameters"), dict):
        training["data"] = _data_summary(data)
    for state in (checkpoint.get("callbacks") or {}).values():
        if validation := _best_validation(state):
            training["validation"] = validation
    if test := _logged_test_metrics(path):
        training["test"] = test
    if checkpoint.get(FINE_TUNED_FROM):
        training[FINE_TUNED_FROM] = checkpoint[FINE_TUNED_FROM]
    return training


def _training_of_module(module: L.LightningModule) -> dict[str, Any]:
    """What the Trainer a module is attached to knows of its training (`SavedModel.training`)."""
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached to a Trainer
        return {}
    training: dict[str, Any] = {}
    if getattr(module, FINE_TUNED_FROM, None):
        training[FINE_TUNED_FROM] = getattr(module, FINE_TUNED_FROM)
    if trainer.datamodule is not None and trainer.datamodule.hparams:
        training["data"] = _data_summary(dict(trainer.datamodule.hparams))
    callback = trainer.checkpoint_callback
    if callback is not None and (validation := _best_validation(callback.state_dict())):
        training["validation"] = validation
    metrics = trainer.callback_metrics
    test = {key.removeprefix("test/"): float(value) for key, value in metrics.items() if key.startswith("test/")}
    if test:
        training["test"] = {"metrics": test, "run": None, "of_these_weights": True}
    return training


def _best_validation(state: Any) -> dict[str, Any] | None:
    """The best validation score in a `ModelCheckpoint`'s state, if it holds one."""
    if not isinstance(state, dict) or state.get("best_model_score") is None:
        return None
    best, path = float(state["best_model_score"]), Path(state.get("best_model_path") or "").name
    return {"monitor": state.get("monitor"), "best": best, "best_checkpoint": path}


def _data_summary(hparams: dict[str, Any]) -> dict[str, Any]:
    """The data module's settings that define the split under its protocol (the column mapping aside) and the MOS
    scale. Local paths are cut to their last part: where the data lay on the training machine says nothing."""
    keys = [key for key in split_settings(hparams.get("protocol")) if key != "source_options"]
    keys.insert(keys.index("splits_file"), "mos_range")
    summary = {key: hparams[key] for key in keys if hparams.get(key) not in (None, "")}
    root = str(summary.get("root", ""))
    if summary.get("source") != "hf" or _looks_like_path(root) or Path(root).expanduser().exists():
        summary["root"] = Path(root).name
    if "splits_file" in summary:
        summary["splits_file"] = Path(summary["splits_file"]).name
    return summary


def _logged_test_metrics(checkpoint: Path) -> dict[str, Any]:
    """The test metrics a CSVLogger wrote for a checkpoint in ``<logger>/version_N/checkpoints/``: those of the
    newest `test` run of it (a version whose config.yaml names it as ckpt_path), else those the training run logged."""
    run = checkpoint.parent.parent
    if checkpoint.parent.name != "checkpoints":
        return {}
    tests = [folder for folder in run.parent.iterdir() if _tests_checkpoint(folder / "config.yaml", checkpoint)]
    tests.sort(key=lambda folder: (folder / "metrics.csv").stat().st_mtime if (folder / "metrics.csv").is_file() else 0)
    for folder, of_these_weights in [*((folder, True) for folder in reversed(tests)), (run, False)]:
        if metrics := _test_row(folder / "metrics.csv"):
            return {"metrics": metrics, "run": folder.name, "of_these_weights": of_these_weights}
    return {}


def _tests_checkpoint(config_path: Path, checkpoint: Path) -> bool:
    """Whether a run's config.yaml names `checkpoint` as its ckpt_path (a relative one by its trailing parts)."""
    import yaml

    try:
        value = (yaml.safe_load(config_path.read_text()) or {}).get("ckpt_path") if config_path.is_file() else None
    except (OSError, yaml.YAMLError, AttributeError):
        return False
    if not isinstance(value, str):
        return False
    named, parts = Path(value).expanduser(), checkpoint.resolve().parts
    return named.resolve() == checkpoint.resolve() or parts[len(parts) - len(named.parts) :] == named.parts


def _test_row(path: Path) -> dict[str, float]:
    """The last test metrics in a CSVLogger's metrics.csv, keyed without the "test/" prefix; none if it has none."""
    if not path.is_file():
        return {}
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            tests = [key for key in reader.fieldnames or [] if key.startswith("test/")]
            rows = [{key.removeprefix("test/"): float(row[key]) for key in tests if row[key]} for row in reader]
    except (OSError, csv.Error, ValueError) as err:
        warnings.warn(f"{path}: unreadable ({err}); the model card goes without test metrics", stacklevel=2)
        return {}
    tested = [row for row in rows if row]
    return tested[-1] if tested else {}


# ---- encoders --------------------------------------------------------------------------------------------------------


def _hub_origin(name: str) -> tuple[str, str] | None:
    """(repo id, commit) of a folder of the Hugging Face cache (``models--org--name/snapshots/<commit>``), else None."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return None
    path = path.resolve()
    if path.parent.name != "snapshots":  # the cache's layout, checked first: scanning a cache reads all of it
        return None
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        cache = scan_cache_dir(path.parents[2])
    except (CacheNotFound, OSError, ValueError):
        return None
    for repo in cache.repos:
        for revision in repo.revisions:
            if repo.repo_type == "model" and revision.snapshot_path.resolve() == path:
                return repo.repo_id, revision.commit_hash
    return None


def hub_commit(repo_id: str, revision: str | None, stream: str = "hub") -> str:
    """The commit a hub encoder's revision resolves to, as `from_pretrained` resolves it (through the Hugging Face
    cache and offline switches, or the hub)."""
    from huggingface_hub import constants
    from transformers.utils import cached_file
    from transformers.utils.hub import extract_commit_hash

    try:
        commit = extract_commit_hash(cached_file(repo_id, CONFIG_NAME, revision=revision), None)
        why = "its config.json is not in a hub snapshot"
    except (OSError, ValueError) as err:
        commit, why = None, err
    if commit is None:
        raise BadModelError(
            f"the {stream} encoder {repo_id!r} is neither a folder ({Path(repo_id).resolve()}) nor a model in the "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}) or on the hub: {why}"
        )
    return commit


def _hub_snapshot(repo_id: str, commit: str, stream: str) -> Path:
    """The Hugging Face cache's folder of `repo_id` at `commit`, holding what loading the encoder reads. A commit never
    changes, so a complete cached copy is used without asking the hub; otherwise it is downloaded."""
    from huggingface_hub import constants, snapshot_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, CONFIG_NAME, revision=commit)
    if isinstance(cached, str) and _weight_files(Path(cached).parent):
        return Path(cached).parent
    try:
        folder = Path(snapshot_download(repo_id, revision=commit, allow_patterns=[*ENCODER_FILES, *SAFETENSORS_FILES]))
        if not _weight_files(folder):
            folder = Path(snapshot_download(repo_id, revision=commit, allow_patterns=list(PYTORCH_FILES)))
    except OSError as err:
        raise BadModelError(
            f"the {stream} encoder {repo_id} at commit {commit} is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and could not be downloaded: {err}"
        ) from err
    if not _encoder_files(folder):
        raise BadModelError(f"the {stream} encoder {repo_id} at commit {commit}: {folder} lacks its config or weights")
    return folder


def _weight_files(folder: Path) -> list[Path]:
    """A checkpoint folder's weight files: safetensors where there are any, else PyTorch's."""
    return [path for pattern in SAFETENSORS_FILES for path in sorted(folder.glob(pattern))] or [
        path for pattern in PYTORCH_FILES for path in sorted(folder.glob(pattern))
    ]


def _encoder_files(folder: Path) -> list[Path]:
    """What loading the CLIP checkpoint in `folder` reads; none unless it has its config.json and weights."""
    weights = _weight_files(folder)
    if not (folder / CONFIG_NAME).is_file() or not weights:
        return []
    return [folder / name for name in ENCODER_FILES if (folder / name).is_file()] + weights


def _copy_encoder(source: Path, target: Path, stream: str) -> None:
    """Copy what loading a local CLIP checkpoint reads into `target`. Plain copies, so the files get the usual mode
    (transformers writes weights 0600)."""
    if target.resolve() == source:  # saved again into the folder it was loaded from
        return
    files = _encoder_files(source)
    if not files:
        raise BadModelError(f"the {stream} encoder folder {source} holds no CLIP checkpoint (config.json and weights)")
    if any(file.suffix == ".bin" for file in files):  # a saved folder is read from safetensors only
        raise BadModelError(
            f"the {stream} encoder folder {source} holds PyTorch .bin weights (a pickle) and no safetensors: save the "
            "encoder again with `save_pretrained(folder)`, which writes safetensors, and save the model from it"
        )
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for file in files:
        shutil.copyfile(file, target / file.name)


def _located_encoders(
    net: ModelConfig, entries: dict[str, dict[str, Any]], folder: Path, origin: Path
) -> tuple[ModelConfig, dict[str, str]]:
    """`net` with each encoder as config.json's `entries` place it (a copy by its path inside `folder`, a hub encoder
    by its id), and the recorded commit of each hub encoder. A saved folder is untrusted input: anything but a
    safetensors copy inside it or a hub id is refused before any file it names is opened."""
    unknown = sorted(set(entries) - set(STREAMS))
    if unknown:
        raise BadModelError(f"{origin}: unknown encoder entries {', '.join(unknown)}: save or export the model again")
    names, commits = {}, {}
    for stream in STREAMS:
        entry = entries.get(stream)
        if entry is None or entry.get("folder") is None:
            name = getattr(net, f"{stream}_encoder") if entry is None else entry["hub_id"]
            _check_hub_id(name, stream, origin)
            names[f"{stream}_encoder"] = name
            if entry is not None and entry.get("commit"):
                commits[stream] = entry["commit"]
            continue
        path = (folder / entry["folder"]).resolve()
        files = _encoder_files(path) if path.is_relative_to(folder.resolve()) else []
        if not files:
            raise BadModelError(
                f"{origin}: the {stream} encoder is missing or incomplete: no CLIP checkpoint (config.json and "
                f"weights) in {path}; copy the whole model folder, or save the model again"
            )
        pickled = [file for file in files if file.suffix == ".bin"]
        if pickled:
            raise BadModelError(
                f"{pickled[0]}: the {stream} encoder's weights are a pickle (PyTorch .bin), which a saved model is "
                "never read from: only safetensors are; save or export the model again"
            )
        for file in files:
            _check_readable(file)
        names[f"{stream}_encoder"] = str(path)
    return replace(net, **names), commits


def _check_hub_id(name: Any, stream: str, origin: Path) -> None:
    """Refuse an encoder name of a saved folder that is not a well-formed hub id, or that is one but also names a local
    path here (transformers would load that path), before anything it names is opened."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    with suppress(HFValidationError):
        validate_repo_id(name)  # "name" or "owner/name", by the hub's rules: no "..", no path; None passes
        if name is not None and not Path(name).exists():
            return
    raise BadModelError(
        f"{origin}: the {stream} encoder {str(name)!r} is not a hub id (owner/name) nor a folder under {ENCODERS}/: a "
        "saved model reads no file outside its folder; save or export the model again"
    )


def _check_readable(path: Path) -> None:
    """Open `path` for reading once, so that a file the user may not read is reported as such (safetensors and
    transformers report it as missing)."""
    try:
        path.open("rb").close()
    except PermissionError as err:
        raise BadModelError(
            f"permission denied: {path} is not readable by this user; ask its owner to make it readable"
        ) from err


def _hub_failure(err: BaseException) -> str:
    """Why a hub id could not be fetched, in a few words."""
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(err, RepositoryNotFoundError):
        return "no such repo (or it is private: log in with `hf auth login`)"
    if isinstance(err, HFValidationError):
        return "not a valid repo id either"
    if isinstance(err, LocalEntryNotFoundError):
        return "the hub could not be reached (no network, or HF_HUB_OFFLINE set) and the Hugging Face cache has no copy"
    first = str(err).strip().splitlines()
    return f"the hub could not be reached ({first[0] if first else type(err).__name__})"


def _same_setting(name: str, a: Any, b: Any) -> bool:
    return _same_encoder(a, b) if name.endswith("_encoder") else a == b


def _same_encoder(a: str, b: str) -> bool:
    """Whether two encoder names load the same checkpoint: the same hub repo (by id, or as a folder of the Hugging
    Face cache), or local folders with byte-identical config and weights (a saved model's copy and its original)."""
    if a == b:
        return True
    repo_a, repo_b = _hub_repo(a), _hub_repo(b)
    if repo_a or repo_b:
        return repo_a == repo_b
    folder_a, folder_b = Path(a).expanduser(), Path(b).expanduser()
    names = [path.name for path in _weight_files(folder_a)]
    if not names or names != [path.name for path in _weight_files(folder_b)]:
        return False
    try:
        return all(filecmp.cmp(folder_a / name, folder_b / name, shallow=False) for name in [CONFIG_NAME, *names])
    except OSError:
        return False


def _hub_repo(name: str) -> str | None:
    """The hub id an encoder name loads: the name itself, or the id of a Hugging Face cache folder; None for another
    local folder."""
    if origin := _hub_origin(name):
        return origin[0]
    return None if Path(name).expanduser().is_dir() else name


# ---- checks ----------------------------------------------------------------------------------------------------------


def _model_config(values: dict[str, Any], origin: str | Path) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BadModelError(
            f"{origin}: unknown network settings {', '.join(unknown)}: written by a newer mst-clipiqa? "
            f"(this is {__version__})"
        )
    return ModelConfig(**values)


def _checked_range(values: Any, origin: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise BadModelError(f"{origin}: the MOS range must be two numbers (low, high), not {values!r}") from err
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise BadModelError(f"{origin}: invalid MOS range ({low}, {high}); was the model trained?")
    return low, high


def _where(name: str) -> str:
    """A path as given, and where it was looked for when that differs."""
    looked = Path(name).expanduser().resolve()
    return name if str(looked) == name else f"{name} (looked in {looked})"


def _looks_like_path(source: str) -> bool:
    """Hub ids are "name" or "owner/name"; anything else that does not exist locally is a mistyped path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).suffix == ".ckpt"
