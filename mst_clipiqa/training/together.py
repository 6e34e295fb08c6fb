"""Several splits of a protocol trained in one loop: `mst-clipiqa benchmark --together`.

On cached features a fit is mostly the loop around a small step, so the splits share one. Each member (a copy of the
trainable part over the shared frozen towers, with its own split's loaders, MOS range, optimizer and schedule) scores
its split's batch, and one backward of the summed losses follows. Members share no parameter, so each gets its own
loss's gradient: every split's weights, best epoch and test metrics are those of a fit of it alone
(tests/test_together.py). Each member's best weights become ``<run>/checkpoints/split<k>-best-epoch<E>.ckpt``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor, nn

from mst_clipiqa.data.datamodule import IQADataModule
from mst_clipiqa.data.splits import Split
from mst_clipiqa.errors import OptionError
from mst_clipiqa.internals import lightning_checkpoint
from mst_clipiqa.losses import iqa_loss
from mst_clipiqa.metrics import make_metrics
from mst_clipiqa.model import MSTCLIPIQA
from mst_clipiqa.training.checkpoints import run_dir
from mst_clipiqa.training.lit_module import (
    MSTCLIPIQAModule,
    OneThreadForCachedSteps,
    make_optimizer,
    make_schedule,
    net_inputs,
)


class TogetherData(L.LightningDataModule):
    """The first `splits` splits of `data`'s protocol (all when None), each with its own loaders; `data` prepares the
    source and features once. A training batch is {member: batch of its split, or None once its split is exhausted};
    validation and test run one loader per member (``dataloader_idx``)."""

    def __init__(self, data: IQADataModule, splits: int | None = None):
        super().__init__()
        self.data = data
        self.count = splits
        self.splits: list[Split] = []
        """The members' splits, in protocol order."""
        self.mos_ranges: list[tuple[float, float]] = []
        """Each member's MOS scale (see `IQADataModule.mos_range`)."""
        self._train: CombinedLoader | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        data = self.data
        data.trainer = self.trainer
        data.setup(stage)
        available = data.all_splits()
        if self.count is not None and self.count > len(available):
            raise OptionError(f"--splits {self.count}: the protocol makes only {len(available)} splits")
        count = len(available) if self.count is None else self.count
        self.splits = [data.split_at(index, stage, available) for index in range(count)]
        self.mos_ranges = [data.mos_range_of(split) for split in self.splits]

    def train_dataloader(self) -> CombinedLoader:
        if self._train is None:  # built once: the members' schedules are sized on it (`TogetherModule`)
            loaders = {k: self.data.loader(split.train, train=True) for k, split in enumerate(self.splits)}
            self._train = CombinedLoader(loaders, mode="max_size")
        return self._train

    def val_dataloader(self) -> list:
        return [self.data.loader(split.val, train=False) for split in self.splits]

    def test_dataloader(self) -> list:
        return [self.data.loader(split.test, train=False) for split in self.splits]


@dataclass
class Best:
    """A member's best validation so far."""

    srcc: float
    epoch: int
    step: int
    weights: dict[str, Tensor]


class TogetherModule(OneThreadForCachedSteps, L.LightningModule):
    """The members of a `TogetherData`, trained in one loop from `model`'s network. After `Trainer.test`,
    `results[k]` holds member k's test metrics at its best weights and `checkpoints[k]` its best checkpoint's path."""

    def __init__(self, model: MSTCLIPIQAModule):
        super().__init__()
        self.automatic_optimization = False  # one backward for all members, then each member's optimizer
        self.net = model.net
        """Member 0, whose frozen towers and settings the data follows (`IQADataModule.follow`)."""
        self.loss_config, self.optim_config = model.loss_config, model.optim_config
        self.member_hparams = dict(model.hparams)
        self.member_on_save_checkpoint = model.on_save_checkpoint
        """The module's own hook, which each member's checkpoint goes through as a solo fit's does."""
        self.members = nn.ModuleList()
        self.val_metrics = nn.ModuleList()
        self.test_metrics = nn.ModuleList()
        self.steps: list[int] = []
        self.best: dict[int, Best] = {}
        self.results: dict[int, dict[str, float]] = {}
        self.checkpoints: dict[int, str] = {}

    # ---- the members ---------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        if not isinstance(data, TogetherData):
            raise TypeError("TogetherModule trains on a TogetherData")
        if stage == "fit":
            check_trainer(self.trainer)
        if not self.members:
            shared = {id(module): module for module in self.net.frozen_modules()}  # one set of frozen towers
            copies = [copy.deepcopy(self.net, memo=dict(shared)) for _ in data.splits[1:]]
            self.members = nn.ModuleList([self.net, *copies])
            for member, mos_range in zip(self.members, data.mos_ranges):
                member.set_mos_range(*mos_range)
            self.val_metrics = nn.ModuleList(make_metrics("val/") for _ in self.members)
            self.test_metrics = nn.ModuleList(make_metrics("test/", logistic=True) for _ in self.members)
            self.steps = [0] * len(self.members)

    def _members_of(self, batch: dict[int, dict[str, Any] | None]) -> list[tuple[int, MSTCLIPIQA, dict[str, Any]]]:
        return [(k, self.members[k], part) for k, part in batch.items() if part is not None]

    # ---- training ------------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        optimizers = [make_optimizer(member, self.optim_config) for member in self.members]
        if self.optim_config.scheduler == "constant":
            return optimizers
        loaders = self.trainer.datamodule.train_dataloader().iterables
        epochs = max(self.trainer.max_epochs, 1)
        schedules = [
            make_schedule(optimizer, self.optim_config, len(loaders[k]) * epochs)
            for k, optimizer in enumerate(optimizers)
        ]
        return optimizers, [{"scheduler": schedule, "interval": "step"} for schedule in schedules]

    def _cached(self, batch: dict[int, dict[str, Any] | None]) -> bool:
        return any("coarse_embeds" in part for _, _, part in self._members_of(batch))

    def training_step(self, batch: dict[int, dict[str, Any] | None], batch_idx: int) -> None:
        optimizers, schedules = self.optimizers(), self.lr_schedulers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedules = schedules if isinstance(schedules, list) else [schedules] if schedules else []
        stepped, losses = [], []
        for k, member, part in self._members_of(batch):
            score = member(**net_inputs(part)).score
            losses.append(iqa_loss(score, member.to_internal(part["mos"]), self.loss_config))
            stepped.append(k)
            optimizers[k].zero_grad()
        # Members share no parameter: each one's gradient is its own loss's, exactly as alone.
        self.manual_backward(torch.stack(losses).sum())
        for k in stepped:
            optimizers[k].step()
            if schedules:
                schedules[k].step()
            self.steps[k] += 1
        self.log("train/loss", torch.stack(losses).detach().mean(), prog_bar=True)

    # ---- evaluation ----------------------------------------------------------------------------------------------

    def _evaluate(self, batch: dict[str, Any], k: int, metrics: nn.ModuleList) -> None:
        member = self.members[k]
        metrics[k].update(member.to_mos(member(**net_inputs(batch)).score).float(), batch["mos"].float())

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, self.val_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, self.test_metrics)

    def _computed(self, metrics: nn.ModuleList) -> list[dict[str, Tensor]]:
        values = []
        for k, member_metrics in enumerate(metrics):
            computed = member_metrics.compute()
            member_metrics.reset()
            self.log_dict({f"split{k}/{name}": value for name, value in computed.items()})
            values.append(computed)
        return values

    def on_validation_epoch_end(self) -> None:
        for k, computed in enumerate(self._computed(self.val_metrics)):
            if not self.trainer.sanity_checking:
                self._keep_if_best(k, float(computed["val/srcc"]))

    def _keep_if_best(self, k: int, srcc: float) -> None:
        """`ModelCheckpoint(monitor="val/srcc", mode="max")`'s rule: the first validation, then any strictly higher
        one; NaN counts as -inf."""
        srcc = -math.inf if math.isnan(srcc) else srcc
        if k not in self.best or srcc > self.best[k].srcc:
            weights = {name: value.detach().clone() for name, value in self.members[k].saved_state().items()}
            self.best[k] = Best(srcc, self.current_epoch, self.steps[k], weights)

    def on_fit_end(self) -> None:
        """Every member takes its best weights, which are written as its checkpoint."""
        folder = run_dir(self.trainer) / "checkpoints"
        for k, best in self.best.items():
            self.members[k].load_state_dict(best.weights, strict=False)
            if self.trainer.is_global_zero:
                self.checkpoints[k] = str(self._save(k, best, folder))

    def _save(self, k: int, best: Best, folder: Path) -> Path:
        """Member k's best weights as the checkpoint a fit of its split alone keeps (`Trainer.save_checkpoint` would
        write every member, at the current epoch and step)."""
        path = folder / f"split{k}-best-epoch{best.epoch:02d}.ckpt"
        data = self.trainer.datamodule.data
        checkpoint = lightning_checkpoint(
            {f"net.{name}": value for name, value in best.weights.items()},
            epoch=best.epoch,
            global_step=best.step,
            hparams=self.member_hparams,
            datamodule_hparams={**dict(data.hparams), "split_index": k},
            callbacks={
                "ModelCheckpoint": {"monitor": "val/srcc", "best_model_score": best.srcc, "best_model_path": str(path)}
            },
        )
        self.member_on_save_checkpoint(checkpoint)  # e.g. the saved model it was fine-tuned from
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, path)
        return path

    def on_test_epoch_end(self) -> None:
        for k, computed in enumerate(self._computed(self.test_metrics)):
            self.results[k] = {name.removeprefix("test/"): float(value) for name, value in computed.items()}


def check_trainer(trainer: L.Trainer) -> None:
    """Refuse, by name, the Trainer settings under which members could not train exactly as alone."""
    refused = {
        "several devices or nodes": trainer.world_size > 1,
        "trainer.gradient_clip_val": trainer.gradient_clip_val not in (None, 0),
        "trainer.accumulate_grad_batches": trainer.accumulate_grad_batches != 1,
        "trainer.max_steps": trainer.max_steps != -1,
        "trainer.max_epochs -1": trainer.max_epochs in (None, -1),
        "trainer.limit_train_batches": trainer.limit_train_batches != 1.0,
        "trainer.val_check_interval": trainer.val_check_interval != 1.0,
        "float16 loss scaling": getattr(trainer.precision_plugin, "scaler", None) is not None,
    }
    if culprits := [name for name, found in refused.items() if found]:
        raise OptionError(
            f"--together trains each split exactly as alone, which it cannot with {', '.join(culprits)}: "
            "leave those at their defaults, or run the benchmark without --together"
        )
