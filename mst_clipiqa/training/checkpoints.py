"""Checkpoints on shared machines: read without running code, find the one to resume, continue where it left off.

- `read_checkpoint` loads with ``weights_only=True`` (a pickle could run code) and names the file at fault.
- ``--ckpt_path last`` (`resolve_ckpt_path`) looks through every logger version of the run and the SLURM
  ``hpc_ckpt_*.ckpt`` files, not only the current version's folder, and takes the newest checkpoint of the same
  network and split (another split's would leak its test images into training).
- A resumed fit goes on in the run's folder (`run_dir`), log and W&B run, whose names every checkpoint records
  (`ResumingModelCheckpoint`, `continue_run`), so its best-k bookkeeping carries on.
"""

from __future__ import annotations

import csv
import pickle
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mst_clipiqa.data.splits import PROTOCOLS, split_settings
from mst_clipiqa.data.tables import Columns
from mst_clipiqa.errors import BadCheckpointError

SPLIT_KEYS = split_settings(*PROTOCOLS)
"""Data module settings that decide which rows train and which test, under any protocol: a run resumes only a
checkpoint that agrees on all of them."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True``, its tensors on the CPU. A missing file is
    FileNotFoundError; a damaged one, or one holding a pickled object (never unpickled), `BadCheckpointError`."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except pickle.UnpicklingError as err:
        # torch names the first callable the pickle wanted to import, e.g. "GLOBAL posix.system".
        code = re.search(r"GLOBAL [\w.]+", str(err))
        if code:
            raise BadCheckpointError(
                f"{path}: refused to load: it holds a pickled object that only running code could rebuild "
                f"({code.group(0)}). mst-clipiqa checkpoints hold tensors and plain data only, so this file was "
                "altered or comes from elsewhere; it was not unpickled"
            ) from err
        raise BadCheckpointError(f"{path} is not a readable checkpoint (corrupted or not a checkpoint)") from err
    except Exception as err:  # torch reports damage as RuntimeError, EOFError, KeyError, ... depending on where
        raise BadCheckpointError(
            f"{path} is not a readable checkpoint: truncated or corrupted ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'})"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise BadCheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def _candidates(trainer: L.Trainer) -> list[Path]:
    """Every last*.ckpt of this run's checkpoint folders, all logger versions, and the SLURM hpc checkpoints."""
    root = Path(trainer.default_root_dir)
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
        folders = [Path(callback.dirpath)]
    elif trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else root
        # Lightning's layout, <save_dir>/<name>/<version>/checkpoints, over every version.
        folders = [path for path in (Path(save_dir) / str(logger.name)).glob("*/checkpoints") if path.is_dir()]
    else:
        folders = [root / "checkpoints"]
    files = [path for folder in folders for path in folder.glob("last*.ckpt")] + list(root.glob("hpc_ckpt_*.ckpt"))
    return sorted(files, key=lambda path: path.stat().st_mtime, reverse=True)


def _differences(checkpoint: dict[str, Any], net: dict[str, Any], data: dict[str, Any]) -> list[str]:
    saved_net = checkpoint.get("hyper_parameters", {}).get("net")
    saved_data = checkpoint.get("datamodule_hyper_parameters", {})
    differ = ["model.net"] if saved_net != net else []
    return differ + [
        f"data.{key}" for key in SPLIT_KEYS if key in data and not _same(key, saved_data.get(key), data[key])
    ]


def _same(key: str, saved: Any, current: Any) -> bool:
    """Whether a data setting saved in a checkpoint equals the run's. A column mapping is compared with every field
    filled in: checkpoints of earlier versions stored only the fields a user gave."""
    if key == "source_options" and isinstance(saved, dict) and current is not None:
        current = asdict(current) if is_dataclass(current) else dict(current)
        try:
            return asdict(Columns(**saved)) == asdict(Columns(**current))
        except TypeError:  # a field this version does not know
            return False
    return saved == current


def find_last_checkpoint(trainer: L.Trainer, net: dict[str, Any], data: dict[str, Any]) -> Path | None:
    """The newest checkpoint of the network `net` and the split of `data` (hyperparameters) among the run's, or None.
    Unreadable ones and those of another network or split are skipped with a warning that says why."""
    skipped = []
    for path in _candidates(trainer):
        try:
            differ = _differences(read_checkpoint(path), net, data)
        except BadCheckpointError as err:
            skipped.append(str(err))
            continue
        if not differ:
            if skipped:
                rank_zero_warn("skipped newer checkpoints:\n  " + "\n  ".join(skipped))
            return path
        skipped.append(f"{path}: another run (differs in {', '.join(differ)})")
    if skipped:
        rank_zero_warn("no checkpoint to resume; skipped:\n  " + "\n  ".join(skipped))
    return None


def resolve_ckpt_path(
    ckpt_path: str | None, trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule | None
) -> str | None:
    """The ``ckpt_path`` to hand the Trainer: "last" becomes the checkpoint `find_last_checkpoint` picks.

    When none fits, "last" stays: Lightning then says there is nothing to resume and starts afresh, where None would
    let it fall back on a SLURM checkpoint without these checks. Any other value passes through.
    """
    if ckpt_path != "last":
        return ckpt_path
    data = dict(datamodule.hparams) if datamodule is not None else {}
    found = find_last_checkpoint(trainer, model.hparams.get("net"), data)
    return str(found) if found is not None else ckpt_path


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of this run's own files (config.yaml, splits.json, reports), the one that holds its checkpoints/.

    That is ``<save_dir>/<name>/<version>`` of the first logger (the W&B run id for a `WandbLogger`, whose
    `Trainer.log_dir` all its runs share), ``default_root_dir`` without one, or the folder of the run a fit resumes.
    Call it on every rank: rank 0 decides and broadcasts.
    """
    folder = None
    if trainer.is_global_zero:
        callback = trainer.checkpoint_callback
        if isinstance(callback, ResumingModelCheckpoint) and callback.resumed_run_dir is not None:
            folder = callback.resumed_run_dir
        elif trainer.loggers:
            logger = trainer.loggers[0]
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            folder = Path(logger.save_dir or trainer.default_root_dir, str(logger.name), version)
        else:
            folder = Path(trainer.default_root_dir)
    return Path(trainer.strategy.broadcast(str(folder) if folder is not None else None))


def new_run_file(trainer: L.Trainer, folder: Path, name: str) -> Path:
    """Where this run writes its file `name` in its `folder` (from `run_dir`), never over an earlier run's file.

    That is ``folder/name``, or, if an earlier run left one (runs without a logger share ``default_root_dir``), the
    first free ``<stem>-vN<suffix>``, as Lightning names checkpoints. In the folder of the run a fit resumes,
    ``folder/name`` is rewritten.
    """
    path = folder / name
    callback = trainer.checkpoint_callback
    if isinstance(callback, ResumingModelCheckpoint) and callback.resumed_run_dir == folder:
        return path
    version = 0
    while path.exists():
        version += 1
        path = folder / f"{Path(name).stem}-v{version}{Path(name).suffix}"
    return path


def continue_run(trainer: L.Trainer, ckpt_path: str | None, logger_args: Sequence[dict[str, Any] | None] = ()) -> None:
    """Before a fit from the checkpoint `ckpt_path`: go on in the run it was saved by, its folder and its W&B run.

    The run's folder, if it still exists, becomes this run's `run_dir`, where a CSV or TensorBoard logger logs on
    (`log_on_in`). Every `WandbLogger` without an id of its own is made anew with the run's id and ``resume="allow"``,
    its steps going on from the checkpoint's. `logger_args` are the loggers' arguments as configured, in order (None
    for Lightning's default logger). Call it before the fit starts, as Lightning starts the W&B run at setup.
    """
    callback = trainer.checkpoint_callback
    if not (ckpt_path and Path(ckpt_path).is_file() and isinstance(callback, ResumingModelCheckpoint)):
        return
    checkpoint = read_checkpoint(ckpt_path)
    state = checkpoint.get("callbacks", {}).get(callback.state_key, {})
    folder, run_id = state.get("run_dir"), state.get("wandb_id")
    args = list(logger_args) + [None] * len(trainer.loggers)
    if folder and Path(folder).is_dir():
        callback.resumed_run_dir = Path(folder)
        trainer.loggers = [log_on_in(lg, Path(folder), args[i], checkpoint) for i, lg in enumerate(trainer.loggers)]
        rank_zero_info(f"Resuming: the run's files and checkpoints go on in {folder}")
    resumable = [i for i, lg in enumerate(trainer.loggers) if isinstance(lg, WandbLogger) and lg.version is None]
    if run_id and resumable:
        loggers = list(trainer.loggers)
        for i in resumable:
            if args[i] is not None:  # WandbLogger takes an id at construction only
                loggers[i] = type(loggers[i])(**{**args[i], "id": run_id, "resume": "allow"})
        trainer.loggers = loggers
        callback.resumed_wandb_step = state.get("wandb_step")
        rank_zero_info(f"Resuming: W&B run {run_id} continues")


def log_on_in(logger: Logger, folder: Path, args: dict[str, Any] | None, checkpoint: dict[str, Any]) -> Logger:
    """`logger`, or, if it is a CSV or TensorBoard logger about to open a new version folder beside `folder`, the run
    it resumes, the same logger made anew (from `args`, its arguments, or as Lightning's default logger) on `folder`.

    Lightning's CSV writer starts metrics.csv afresh, so the rows logged up to the checkpoint are written back: the
    file reads as one run.
    """
    if not isinstance(logger, CSVLogger | TensorBoardLogger) or Path(logger.log_dir).exists():
        return logger
    if Path(logger.root_dir).resolve() != folder.resolve().parent:
        return logger
    kept = []
    if isinstance(logger, CSVLogger) and (folder / "metrics.csv").is_file():
        with (folder / "metrics.csv").open(newline="") as file:
            rows = [{key: value for key, value in row.items() if value != ""} for row in csv.DictReader(file)]
        epoch, step = checkpoint.get("epoch", -1), checkpoint.get("global_step", -1)
        kept = [row for row in rows if int(row["step"]) <= step and int(row.get("epoch", epoch)) <= epoch]
    resumed = type(logger)(**{**(args or {"save_dir": logger.save_dir, "name": logger.name}), "version": folder.name})
    if kept:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
            writer = resumed.experiment  # rank 0's; the others' is a stand-in that does nothing
        for row in kept:
            writer.log_metrics({key: value for key, value in row.items() if key != "step"}, int(row["step"]))
        writer.save()
    return resumed


class ResumingModelCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` made for resuming: ``save_last`` refreshes last.ckpt after every evaluation, a resumed fit
    keeps saving into the folder of the run it resumes (when that still exists), and every checkpoint records the
    run's folder and W&B run id for `continue_run`.

    Lightning's own rewrites last.ckpt only with a new top-k file: a crash would lose every epoch since the best one.
    In the resumed run's folder the best-k bookkeeping carries on as if the run had never stopped. A checkpoint
    loaded to validate, test or predict leaves the callback as it is: only a fit resumes.
    """

    resumed_run_dir: Path | None = None
    """The folder of the run this fit resumes, set by `continue_run`; None for a new run."""
    resumed_wandb_step: int | None = None
    """The W&B step counter at the checkpoint this fit resumes, set by `continue_run`."""
    _fitting = False
    _saved_at: int | None = None
    _run_dir: str | None = None
    _wandb_id: str | None = None
    _wandb: WandbLogger | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._fitting = stage == "fit"
        with warnings.catch_warnings():
            if self.resumed_run_dir is not None:  # a resumed run goes on in its own folder, which is not empty
                warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        if self._fitting:
            self._run_dir = str(run_dir(trainer))
            self._wandb = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
            self._wandb_id = self._wandb.version if self._wandb is not None else None
            step = self.resumed_wandb_step
            for logger in trainer.loggers if trainer.is_global_zero and step else ():
                # A run resumed offline starts its counter at 0: its rows would land on the first part's steps.
                if isinstance(logger, WandbLogger) and logger.experiment.step < step:
                    logger.experiment.log({}, step=step)

    def state_dict(self) -> dict[str, Any]:
        step = self._wandb.experiment.step if self._wandb is not None else None  # rank 0's; elsewhere a stand-in
        return {
            **super().state_dict(),
            "run_dir": self._run_dir,
            "wandb_id": self._wandb_id,
            "wandb_step": step if isinstance(step, int) else None,
        }

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not trainer.is_last_batch:  # an evaluation within the epoch; one at its end is followed by the next hook
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self.last_model_path and self._saved_at == trainer.global_step):  # else last.ckpt is of this step
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._saved_at = trainer.global_step

    def _refresh_last(self, trainer: L.Trainer) -> None:
        """Save last.ckpt at this step if Lightning did not: it does only when a top-k file was just written."""
        if (
            not (self.save_last and self._fitting)
            or trainer.fast_dev_run
            or trainer.sanity_checking
            or self._saved_at == trainer.global_step
        ):
            return
        if not self.last_model_path:
            self.last_model_path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
            version = self.STARTING_VERSION
            while self.file_exists(self.last_model_path, trainer):  # never over another run's last.ckpt
                self.last_model_path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST, ver=version)
                version += 1
        trainer.save_checkpoint(self.last_model_path, self.save_weights_only)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._fitting:
            return
        previous = state_dict.get("dirpath")
        if previous and previous != self.dirpath and get_filesystem(previous).isdir(previous):
            self.dirpath = previous
        super().load_state_dict(state_dict)
