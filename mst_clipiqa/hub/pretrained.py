"""`save_pretrained`, `from_pretrained`, `push_to_hub` and `mst-clipiqa export`: trained models in the shareable
format of `mst_clipiqa.hub.saved_model`."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mst_clipiqa.errors import BadModelError, MSTCLIPIQAError, OptionError
from mst_clipiqa.hub.saved_model import CARD_NAME, CONFIG_NAME, ENCODERS, WEIGHTS_NAME, SavedModel
from mst_clipiqa.model import MSTCLIPIQA
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule

__all__ = ["SavedModel", "export_main", "from_pretrained", "push_to_hub", "save_pretrained"]


def save_pretrained(
    model: MSTCLIPIQAModule | MSTCLIPIQA, folder: str | Path, *, mos_range: tuple[float, float] | None = None
) -> Path:
    """Save a trained model as a folder that scores on any machine: config.json, model.safetensors (no pickle), a
    model card (README.md) and copies of local encoders.

    Args:
        model: the LightningModule (its network's MOS range goes along, and what its Trainer knows of the data and
            metrics goes into the card) or a bare network.
        folder: where to write; created if needed, existing files of the same names are replaced.
        mos_range: (low, high) of the MOS scale to report scores on; by default the network's own, or the internal
            1..5 scale for a bare network never trained.

    Returns:
        The folder.
    """
    return SavedModel.of(model, mos_range).save(folder)


def from_pretrained(source: str | Path, *, revision: str | None = None) -> MSTCLIPIQAModule:
    """Load a saved model: a folder from `save_pretrained`, a Lightning `.ckpt`, or a hub repo id.

    Encoders copied into the folder are loaded from there; hub encoders at the commit the folder records, from the
    Hugging Face cache (or the hub, unless HF_HUB_OFFLINE is set). The returned module is in eval mode on the CPU
    and scores exactly as the module that was saved.

    Args:
        source: local folder or checkpoint, or a Hugging Face Hub repo id ("user/name").
        revision: branch, tag or commit of the hub repo.
    """
    saved = SavedModel.read(source, revision)
    module = MSTCLIPIQAModule(net=saved.loadable_net())
    saved.load_into(module.net)
    return module.eval()


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload MST-CLIPIQA model",
) -> str:
    """Upload a saved folder, with its model card and copied encoders, to a Hugging Face Hub model repo (created if
    missing); returns the commit's URL.

    Args:
        folder: a folder written by `save_pretrained` or `mst-clipiqa export`, checked before anything is uploaded.
        repo_id: "user/name" or "org/name".
        private: create the repo private; None keeps the hub's default (or the existing repo's setting).
        token: hub token; None uses HF_TOKEN or the one `hf auth login` stored.
        commit_message: message of the upload commit.

    Raises:
        FileNotFoundError: there is no such folder.
        BadModelError: not a folder (a checkpoint, a hub id), not a complete saved model, or one that names encoders
            outside it.
        MSTCLIPIQAError: offline, no token, the hub unreachable, the repo not found or not writable with the token.
    """
    from huggingface_hub import HfApi, constants, get_token

    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"no such model folder: {folder}")
    if not folder.is_dir():  # a checkpoint: only a saved folder is uploaded
        raise BadModelError(f"{folder} is not a model folder: save one with `save_pretrained` or `mst-clipiqa export`")
    SavedModel.read(folder)  # checks it whole, before anything is uploaded
    if constants.HF_HUB_OFFLINE:
        raise MSTCLIPIQAError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it on a machine online")
    token = token or get_token()
    if not token:
        raise MSTCLIPIQAError(
            f"cannot push to {repo_id}: no Hugging Face token; run `hf auth login` or set HF_TOKEN (a write token)"
        )
    api = HfApi(token=token)
    with _hub_errors(repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, f"{ENCODERS}/*"],
            commit_message=commit_message,
        )
    return commit.commit_url


@contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    """The hub's failures said in one line that names the repo and what to do."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        yield
    except RepositoryNotFoundError as err:
        raise MSTCLIPIQAError(
            f"repo {repo_id} not found, or the token may not write to it: check the name (user/name or org/name) and "
            "that the token has write access to that user or organisation"
        ) from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        what = {401: "the hub refused the token (run `hf auth login` again)", 403: "the token may not write to it"}
        raise MSTCLIPIQAError(f"cannot push to {repo_id}: {what.get(status, str(err).splitlines()[0])}") from err
    except Exception as err:
        # The hub's HTTP client reports an unreachable host in its own exception types.
        if not isinstance(err, OSError) and type(err).__module__.split(".")[0] not in ("httpx", "httpx2", "requests"):
            raise
        raise MSTCLIPIQAError(
            f"cannot push to {repo_id}: the Hugging Face Hub could not be reached ({str(err).splitlines()[0]})"
        ) from err


def export_main(ckpt_path: str | Path, out: str | Path, overwrite: bool = False) -> None:
    """`mst-clipiqa export`: a Lightning checkpoint to the shareable format. A non-empty `out` is replaced only with
    `overwrite`; the model is written beside it and renamed into place, so `out` is never half-written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out} is a file: give the folder to write the model to")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OptionError(f"--out {out} already exists: pass --overwrite true to replace it, or give another folder")
    saved = SavedModel.read(ckpt_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        saved.save(staging / out.name)  # the card names the folder it is written to: the same name as `out`
        if out.exists():
            out.rename(staging / "replaced")
        (staging / out.name).rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"saved {out}: {', '.join(sorted(path.name for path in out.iterdir()))}")
