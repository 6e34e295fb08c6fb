"""The shareable model format: a folder with `config.json` and `model.safetensors`, local or on the Hugging Face Hub.

    my-model/
      config.json         the network's `ModelConfig` (encoder ids and revision, head variant, widths), the MOS range
                          scores are mapped onto, the package version that wrote it
      model.safetensors   the trainable weights only (gated fusion and head): under 3 MB for variant A

The frozen CLIP towers are not copied: the config names them, and `from_pretrained` loads them the usual Hugging Face
way (hub cache, HF_HUB_OFFLINE). Nothing is pickled and no code is fetched: safetensors holds tensors only.

`SavedModel.read` also reads a Lightning checkpoint of `MSTCLIPIQAModule` (without unpickling any object, see
`mst_clipiqa.checkpoints.read_checkpoint`), so a `.ckpt` can be scored, exported (`mst-clipiqa export`) or
fine-tuned from like a saved folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from mst_clipiqa import __version__
from mst_clipiqa.checkpoints import read_checkpoint
from mst_clipiqa.lit_module import INTERNAL_HIGH, INTERNAL_LOW, MSTCLIPIQAModule
from mst_clipiqa.model import MSTCLIPIQA, ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "mst-clipiqa"
FORMAT_VERSION = 1
"""Bump when the folder's layout changes in a way older readers would misread."""

TRAINABLE = ("fusion", "head")
"""The parts of `MSTCLIPIQA` that train; everything else is a frozen CLIP tower named by the config."""

MUST_MATCH = ("coarse_encoder", "fine_encoder", "revision", "variant", "fusion_dim")
"""Config fields that give the trainable weights their shape or meaning: a model can only start from saved weights
that agree on them, and on those of its head in `MUST_MATCH_HEAD`."""
MUST_MATCH_HEAD = {"template": ("template",), "prompt": ("num_heads", "head_hidden")}


@dataclass
class SavedModel:
    """What a saved model holds, wherever it was read from."""

    net: ModelConfig
    """The network's configuration."""
    mos_range: tuple[float, float]
    """(low, high) of the MOS scale the head's internal 1..5 maps onto."""
    weights: dict[str, Tensor]
    """Trainable weights, keyed as in `MSTCLIPIQA.state_dict()` (``fusion.*``, ``head.*``)."""
    package_version: str = __version__
    """Version of mst-clipiqa that wrote it."""
    source: str = ""
    """Where it was read from, for messages."""

    # ---- writing -------------------------------------------------------------------------------------------------

    @classmethod
    def of(cls, model: MSTCLIPIQAModule | MSTCLIPIQA, mos_range: tuple[float, float] | None = None) -> SavedModel:
        """The saved form of a LightningModule (with its MOS range) or of a bare network.

        A bare `MSTCLIPIQA` has no MOS range: pass `mos_range`, or its scores stay on the internal 1..5 scale.
        """
        if isinstance(model, MSTCLIPIQAModule):
            if not model.has_mos_range and mos_range is None:
                raise ValueError("the model has no MOS range yet: train it first, or pass mos_range=(low, high)")
            mos_range = mos_range or tuple(model.mos_range.tolist())
            net = model.net
        else:
            net = model
            mos_range = mos_range or (INTERNAL_LOW, INTERNAL_HIGH)
        weights = {
            f"{part}.{key}": value.detach().cpu().contiguous()
            for part in TRAINABLE
            for key, value in getattr(net, part).state_dict().items()
        }
        return cls(net.config, _checked_range(mos_range, "mos_range"), weights)

    def save(self, folder: str | Path) -> Path:
        """Write config.json and model.safetensors to `folder` (created if needed); returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "package_version": self.package_version,
            "variant": self.net.variant,
            "mos_range": list(self.mos_range),
            "net": asdict(self.net),
        }
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(self.weights, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        return folder

    # ---- reading -------------------------------------------------------------------------------------------------

    @classmethod
    def read(cls, source: str | Path, revision: str | None = None) -> SavedModel:
        """Read a saved folder, a Lightning `.ckpt` file, or a hub repo id (`revision`: its branch, tag or commit).

        Raises:
            FileNotFoundError: a local path that does not exist, or a folder without config.json.
            ValueError: a folder or checkpoint that is not an MST-CLIPIQA model.
        """
        path = Path(source).expanduser()
        if path.is_file():
            return cls._read_checkpoint(path)
        if path.is_dir():
            return cls._read_folder(path)
        if _looks_like_path(str(source)):
            raise FileNotFoundError(f"no such model folder or checkpoint: {source}")
        from huggingface_hub import snapshot_download

        folder = snapshot_download(str(source), revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
        saved = cls._read_folder(Path(folder))
        saved.source = str(source)
        return saved

    @classmethod
    def _read_folder(cls, folder: Path) -> SavedModel:
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} holds no {CONFIG_NAME}: not a saved MST-CLIPIQA model")
        config = json.loads(config_path.read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{config_path} does not describe an MST-CLIPIQA model (format {config.get('format')!r})")
        if config.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{folder} was written by mst-clipiqa {config.get('package_version')} in format version "
                f"{config['format_version']}; this version reads up to {FORMAT_VERSION}: upgrade mst-clipiqa"
            )
        return cls(
            net=_model_config(config["net"], config_path),
            mos_range=_checked_range(config["mos_range"], str(config_path)),
            weights=load_file(folder / WEIGHTS_NAME),
            package_version=config.get("package_version", "unknown"),
            source=str(folder),
        )

    @classmethod
    def _read_checkpoint(cls, path: Path) -> SavedModel:
        checkpoint = read_checkpoint(path)
        try:
            net, state = checkpoint["hyper_parameters"]["net"], checkpoint["state_dict"]
            mos_range = state["mos_range"].tolist()
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a checkpoint of MSTCLIPIQAModule (no {err})") from err
        # Frozen towers, should a checkpoint hold them, come from the config instead.
        prefixes = tuple(f"net.{part}." for part in TRAINABLE)
        weights = {key.removeprefix("net."): value for key, value in state.items() if key.startswith(prefixes)}
        return cls(_model_config(net, path), _checked_range(mos_range, str(path)), weights, source=str(path))

    # ---- loading into a model --------------------------------------------------------------------------------------

    def check_compatible(self, net: ModelConfig) -> None:
        """Raise if `net` differs from the saved network in what gives the weights their shape or meaning."""
        names = MUST_MATCH + MUST_MATCH_HEAD.get(self.net.variant, ())
        differ = [name for name in names if getattr(net, name) != getattr(self.net, name)]
        if differ:
            lines = "; ".join(f"{n}: saved {getattr(self.net, n)!r}, configured {getattr(net, n)!r}" for n in differ)
            raise ValueError(
                f"cannot start from {self.source or 'the saved model'}: the network differs in {lines}. "
                f"Set the configuration to the saved values (e.g. --model.net.{differ[0]})"
            )

    def load_into(self, module: MSTCLIPIQAModule) -> MSTCLIPIQAModule:
        """Copy the trainable weights and the MOS range into `module`, after checking the networks match."""
        self.check_compatible(module.net_config)
        unexpected = sorted(key for key in self.weights if key.split(".", 1)[0] not in TRAINABLE)
        if unexpected:
            raise ValueError(f"{self.source}: unexpected weights {', '.join(unexpected[:5])}")
        for part in TRAINABLE:
            prefix = part + "."
            getattr(module.net, part).load_state_dict(
                {key.removeprefix(prefix): value for key, value in self.weights.items() if key.startswith(prefix)}
            )
        module.set_mos_range(*self.mos_range)
        return module


def save_pretrained(
    model: MSTCLIPIQAModule | MSTCLIPIQA, folder: str | Path, *, mos_range: tuple[float, float] | None = None
) -> Path:
    """Save a trained model as a small shareable folder (config.json + model.safetensors, no pickle).

    Args:
        model: the LightningModule (its MOS range goes along) or a bare network.
        folder: where to write; created if needed, existing files of the same names are replaced.
        mos_range: (low, high) of the MOS scale to report scores on; by default the module's own, or the internal
            1..5 scale for a bare network.

    Returns:
        The folder.
    """
    return SavedModel.of(model, mos_range).save(folder)


def from_pretrained(source: str | Path, *, revision: str | None = None) -> MSTCLIPIQAModule:
    """Load a saved model: a folder from `save_pretrained`, a Lightning `.ckpt`, or a hub repo id.

    The frozen CLIP towers are loaded from the ids in the saved config (hub cache and HF_HUB_OFFLINE apply). The
    returned module is in eval mode on the CPU and scores exactly as the module that was saved.

    Args:
        source: local folder or checkpoint, or a Hugging Face Hub repo id ("user/name").
        revision: branch, tag or commit of the hub repo.
    """
    saved = SavedModel.read(source, revision)
    module = MSTCLIPIQAModule(net=saved.net)
    return saved.load_into(module).eval()


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload MST-CLIPIQA model",
) -> str:
    """Upload a saved folder to a Hugging Face Hub model repo (created if missing); returns the commit's URL.

    Args:
        folder: a folder written by `save_pretrained`, checked before anything is uploaded: it must name its
            encoders by hub id, not by local path.
        repo_id: "user/name" or "org/name".
        private: create the repo private; None keeps the hub's default (or the existing repo's setting).
        token: hub token; None uses the one `hf auth login` stored.
        commit_message: message of the upload commit.
    """
    from huggingface_hub import HfApi

    net = SavedModel.read(folder).net
    local = [name for name in (net.coarse_encoder, net.fine_encoder) if Path(name).expanduser().exists()]
    if local:
        raise ValueError(
            f"{folder} names local encoder folders ({', '.join(local)}) that nobody else has: train with hub ids "
            "(the defaults), or push those encoders to the hub and set their ids in config.json"
        )
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=folder, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME], commit_message=commit_message
    )
    return commit.commit_url


def export_main(argv: list[str]) -> None:
    """`mst-clipiqa export --ckpt_path X.ckpt --out folder`: a Lightning checkpoint to the shareable format."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="mst-clipiqa export",
        description="Convert a Lightning checkpoint into a shareable model folder (config.json + model.safetensors).",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `mst-clipiqa fit`")
    parser.add_argument("--out", required=True, help="folder to write")
    args = parser.parse_args(argv)
    folder = SavedModel.read(args.ckpt_path).save(args.out)
    print(f"saved {folder / CONFIG_NAME} and {folder / WEIGHTS_NAME}")


def _model_config(values: dict[str, Any], origin: str | Path) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"{origin}: unknown network settings {', '.join(unknown)}: written by a newer mst-clipiqa? "
            f"(this is {__version__})"
        )
    return ModelConfig(**values)


def _checked_range(values: Any, origin: str) -> tuple[float, float]:
    low, high = (float(v) for v in values)
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError(f"{origin}: invalid MOS range ({low}, {high}); was the model trained?")
    return low, high


def _looks_like_path(source: str) -> bool:
    """Hub ids are "name" or "owner/name"; anything else that does not exist locally is a mistyped path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).suffix == ".ckpt"
