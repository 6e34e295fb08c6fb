"""`ResumingModelCheckpoint` refreshes last.ckpt after every evaluation, which Lightning's own does only when it keeps
a new top-k file: a run killed after a few epochs without improvement would otherwise resume from the best one."""

from __future__ import annotations

import lightning as L
import pytest
from scripts.runs import embedding_rows
from torch.utils.data import DataLoader

from mst_clipiqa.model import ModelConfig
from mst_clipiqa.training.checkpoints import ResumingModelCheckpoint, read_checkpoint
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule, OptimConfig


class LastSeen(L.Callback):
    """The epoch of last.ckpt at the start of each epoch (None while there is none)."""

    def __init__(self, path):
        self.path, self.epochs = path, []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append(read_checkpoint(self.path)["epoch"] if self.path.is_file() else None)


class Saves(L.Callback):
    """The global step of every checkpoint written."""

    def __init__(self):
        self.steps = []

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.steps.append(trainer.global_step)


@pytest.mark.parametrize("save_top_k", [1, 0])
def test_last_is_refreshed_after_every_evaluation_improved_or_not(tiny_clip, tmp_path, save_top_k):
    # tau = 0 and lr = 0: every score is 3 at every epoch, so val/srcc never improves on the first epoch's.
    net = ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1], tau_init=0.0)
    module = MSTCLIPIQAModule(net=net, optim=OptimConfig(lr=0.0, scheduler="constant"))
    module.net.set_mos_range(0.0, 5.0)
    rows = embedding_rows(24)
    folder = tmp_path / "checkpoints"
    checkpoints = ResumingModelCheckpoint(
        dirpath=folder, monitor="val/srcc", mode="max", save_last=True, save_top_k=save_top_k
    )
    seen, saves = LastSeen(folder / "last.ckpt"), Saves()
    trainer = L.Trainer(
        max_epochs=4, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[checkpoints, seen, saves],
    )  # fmt: skip
    with pytest.warns(UserWarning, match="Correlation is undefined"):
        trainer.fit(module, DataLoader(rows[:16], batch_size=8), DataLoader(rows[16:], batch_size=8))
    # Lightning's own would hold [None, 0, 0, 0] (the first epoch's top-k file), or no last.ckpt with save_top_k 0.
    assert seen.epochs == [None, 0, 1, 2]
    assert read_checkpoint(folder / "last.ckpt")["epoch"] == 3
    # Each file once: the first epoch's top-k file beside last.ckpt, then last.ckpt alone.
    assert saves.steps == [2, 2, 4, 6, 8] if save_top_k else [2, 4, 6, 8]


def test_last_is_written_once_after_each_evaluation_within_and_at_the_end_of_an_epoch(tiny_clip, tmp_path):
    net = ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1], tau_init=0.0)
    module = MSTCLIPIQAModule(net=net, optim=OptimConfig(lr=0.0, scheduler="constant"))
    module.net.set_mos_range(0.0, 5.0)
    rows = embedding_rows(24)
    checkpoints = ResumingModelCheckpoint(
        dirpath=tmp_path / "checkpoints", monitor="val/srcc", mode="max", save_last=True, save_top_k=0
    )
    saves = Saves()
    trainer = L.Trainer(
        max_epochs=2, val_check_interval=0.5, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[checkpoints, saves],
    )  # fmt: skip
    with pytest.warns(UserWarning, match="Correlation is undefined"):
        trainer.fit(module, DataLoader(rows[:16], batch_size=8), DataLoader(rows[16:], batch_size=8))
    # Two steps an epoch, an evaluation after each: last.ckpt at every step, once.
    assert saves.steps == [1, 2, 3, 4]


def test_validating_writes_no_checkpoint(tiny_clip, tmp_path):
    net = ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1])
    module = MSTCLIPIQAModule(net=net)
    module.net.set_mos_range(0.0, 5.0)
    saves = Saves()
    checkpoints = ResumingModelCheckpoint(dirpath=tmp_path, monitor="val/srcc", mode="max", save_last=True)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[checkpoints, saves],
    )  # fmt: skip
    trainer.validate(module, DataLoader(embedding_rows(8), batch_size=8), verbose=False)
    assert saves.steps == [] and not list(tmp_path.glob("*.ckpt"))
