"""What the package relies on of its libraries beyond their public API, each behind one function.
tests/test_internals.py fails loudly, by name, where a release changes them."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import Tensor


def lightning_checkpoint(
    state_dict: dict[str, Tensor],
    *,
    epoch: int,
    global_step: int,
    hparams: dict[str, Any],
    datamodule_hparams: dict[str, Any],
    callbacks: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """A checkpoint in the format `Trainer.save_checkpoint` writes, of weights no Trainer holds (one member of a
    together run), without optimizer or loop state: Lightning has no public way to write one."""
    return {
        "epoch": epoch,
        "global_step": global_step,
        "pytorch-lightning_version": L.__version__,
        "state_dict": state_dict,
        L.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY: hparams,
        L.LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY: datamodule_hparams,
        "callbacks": callbacks,
    }
