"""The LightningModule: training, evaluation and checkpoints around the plain `MSTCLIPIQA` network."""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from transformers import get_cosine_schedule_with_warmup

from mst_clipiqa.hub.saved_model import FINE_TUNED_FROM, LEGACY_MOS_RANGE_KEY, MOS_RANGE_KEY, SavedModel
from mst_clipiqa.losses import LossConfig, iqa_loss
from mst_clipiqa.metrics import make_metrics
from mst_clipiqa.model import MSTCLIPIQA, ModelConfig, QualityOutput
from mst_clipiqa.training.checkpoints import read_checkpoint


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule; only trainable parameters are optimised."""

    name: Literal["adamw", "adam"] = "adamw"
    """Optimiser: 'adamw' (decoupled weight decay) or 'adam' (L2 penalty, as the reference code)."""
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 1e-3
    """Weight decay."""
    scheduler: Literal["cosine", "constant"] = "cosine"
    """'cosine': linear warm-up from zero, then cosine decay to zero over the run (transformers'
    `get_cosine_schedule_with_warmup`); 'constant': no schedule."""
    warmup_fraction: float = 0.05
    """Fraction of the training steps spent warming up (cosine only)."""


def make_optimizer(module: torch.nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser of `module`'s trainable parameters."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer_cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[config.name]
    # One fused kernel for all parameters: the head is small, so its optimizer step is mostly per-op overhead.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return optimizer_cls(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def make_schedule(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: float) -> Any:
    """The cosine schedule with warm-up over `total_steps` optimizer steps, stepped after each of them."""
    total = max(1, int(total_steps))
    return get_cosine_schedule_with_warmup(optimizer, int(config.warmup_fraction * total), total)


class OneThreadForCachedSteps:
    """A LightningModule's mixin: on a CPU, a fit on cached embeddings runs on one thread from its first training
    batch to `on_train_end`. Its steps are small operations, which several threads slow down more than they share
    (docs/PERFORMANCE.md); the encoding pass before it keeps torch's thread count."""

    _threads: int | None = None
    """torch's thread count, kept while the fit runs on one thread."""

    def _cached(self, batch: dict[Any, Any]) -> bool:
        return "coarse_embeds" in batch

    def on_train_batch_start(self, batch: dict[Any, Any], batch_idx: int) -> None:
        if self._threads is None and self.device.type == "cpu" and self._cached(batch):
            self._threads = torch.get_num_threads()
            torch.set_num_threads(1)

    def on_train_end(self) -> None:
        if self._threads is not None:
            torch.set_num_threads(self._threads)
            self._threads = None


def net_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """`MSTCLIPIQA`'s keyword arguments from a batch of pixels or of cached embeddings (see `forward`)."""
    return {
        "pixel_values": batch.get("pixel_values"),
        "prompts": batch.get("prompt"),
        **{name: batch.get(name) for name in ("coarse_embeds", "fine_embeds", "prompt_states", "prompt_mask")},
    }


def _as(cls: type, value: Any) -> Any:
    """Accept a config dataclass or its dict form (checkpoints store plain dicts, loadable with weights_only)."""
    if isinstance(value, cls):
        return value
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in dict(value).items() if k in names})


def settings_from(saved: ModelConfig, net: ModelConfig, source: str) -> ModelConfig:
    """`net` with each setting left at its default taken from the saved model's network."""
    default = ModelConfig()
    taken = {
        f.name: getattr(saved, f.name)
        for f in fields(ModelConfig)
        if getattr(net, f.name) == getattr(default, f.name) != getattr(saved, f.name)
    }
    if taken:
        settings = ", ".join(f"{name}={value!r}" for name, value in taken.items())
        rank_zero_info(f"network settings taken from {source}: {settings}")
    return replace(net, **taken)


def base_model(init_from: str) -> dict[str, str]:
    """How a model card names the saved model `init_from`: a hub id as it is, a local folder or checkpoint by its
    name only."""
    local = Path(init_from).expanduser()
    return {"name": local.resolve().name} if local.exists() else {"hub_id": init_from, "name": init_from}


class MSTCLIPIQAModule(OneThreadForCachedSteps, L.LightningModule):
    """MST-CLIPIQA training and evaluation.

    Args:
        net: the network (encoders, fusion, head variant).
        loss: the objective's weights.
        optim: optimiser and schedule.
        init_from: start from a saved model (a `save_pretrained` folder, a hub id or a .ckpt): its trainable weights,
            and its network settings (encoders, head variant and shape) wherever `net` leaves them at their defaults;
            settings given otherwise must match the saved ones. Fitting maps the training data's MOS scale onto the
            head. Not stored in checkpoints, which hold the resolved network.
    """

    def __init__(
        self,
        net: ModelConfig = ModelConfig(),
        loss: LossConfig = LossConfig(),
        optim: OptimConfig = OptimConfig(),
        init_from: str | None = None,
    ):
        super().__init__()
        _quiet_lightning_notices()
        self.net_config = _as(ModelConfig, net)
        saved = None
        self.fine_tuned_from: dict[str, str] | None = None
        """The saved model this module started from (`init_from`), as its model card names it; kept in checkpoints."""
        if init_from is not None:
            saved = SavedModel.read(init_from)
            self.net_config = settings_from(saved.net, self.net_config, init_from)
            self.fine_tuned_from = base_model(init_from)
        self.loss_config = _as(LossConfig, loss)
        self.optim_config = _as(OptimConfig, optim)
        self.save_hyperparameters(
            {"net": asdict(self.net_config), "loss": asdict(self.loss_config), "optim": asdict(self.optim_config)}
        )
        self.net = MSTCLIPIQA(self.net_config)
        if saved is not None:
            saved.load_into(self.net)
        self.val_metrics = make_metrics("val/")
        self.test_metrics = make_metrics("test/", logistic=True)

    # ---- forward -----------------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> QualityOutput:
        """The network on a batch of pixels ("pixel_values") or of cached embeddings ("coarse_embeds",
        "fine_embeds"), with, for the prompt head, its prompts ("prompt") or their cached states ("prompt_states",
        "prompt_mask")."""
        return self.net(**net_inputs(batch))

    # ---- steps -------------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Training maps the training data's MOS scale onto the head, whatever scale its starting weights had;
        evaluating and predicting keep the model's own (restored from a checkpoint after this hook), else the data's."""
        try:
            datamodule = getattr(self.trainer, "datamodule", None)
        except RuntimeError:  # not attached to a Trainer
            datamodule = None
        data_range = getattr(datamodule, "mos_range", None)
        net = self.net
        if data_range is not None and (stage == "fit" or not net.has_mos_range):
            if net.has_mos_range and tuple(net.mos_range.tolist()) != tuple(data_range):
                rank_zero_info(
                    "scores map onto the training data's MOS range [{:g}, {:g}] (the weights it starts from were "
                    "trained on [{:g}, {:g}])".format(*data_range, *net.mos_range.tolist())
                )
            net.set_mos_range(*data_range)
        if not net.has_mos_range:
            raise RuntimeError("the model has no MOS range: train it first or load a trained checkpoint")

    def on_fit_start(self) -> None:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        rank_zero_info(f"MST-CLIPIQA ({self.net_config.variant} head): {trainable:,} trainable, {frozen:,} frozen")
        for logger in self.loggers:
            logger.log_hyperparams({"trainable_params": trainable, "frozen_params": frozen})

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        score = self(batch).score
        loss = iqa_loss(score, self.net.to_internal(batch["mos"]), self.loss_config)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(score))
        return loss

    def _evaluate(self, batch: dict[str, Any], metrics) -> dict[str, Tensor]:
        output = self(batch)
        loss = iqa_loss(output.score, self.net.to_internal(batch["mos"]), self.loss_config)
        stage = "val" if metrics is self.val_metrics else "test"
        self.log(f"{stage}/loss", loss, batch_size=len(output.score), sync_dist=True)
        outputs = self._per_sample(batch, output)
        metrics.update(outputs["score"], batch["mos"].float())
        # Returned for callbacks that look at single samples (the W&B evaluation logger).
        return {**outputs, "mos": batch["mos"].float()}

    def _per_sample(self, batch: dict[str, Any], output: QualityOutput) -> dict[str, Tensor]:
        """Row index, score on the MOS scale and the gate's mean (the coarse stream's share of z) of each sample."""
        score, coarse_share = self.net.to_mos(output.score).float(), output.gate.float().mean(-1)
        return {"index": batch["index"], "score": score, "coarse_share": coarse_share}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, self.test_metrics)

    def _log_metrics(self, metrics) -> None:
        # compute() gathers every rank's predictions, so correlations are over the whole evaluation set.
        self.log_dict(metrics.compute(), prog_bar=True)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Row index, score and coarse share of each sample; a batch whose rows carry an ``error`` (an image that
        could not be read, kept by `score`) gets no score for those rows and their reason as ``error``."""
        rows: dict[str, Any] = self._per_sample(batch, self(batch))
        if "error" in batch:
            errors = [error or None for error in batch["error"]]
            rows["score"] = [None if error else score for score, error in zip(rows["score"].tolist(), errors)]
            rows["error"] = errors
        return rows

    # ---- optimisation ------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        optimizer = make_optimizer(self, self.optim_config)
        if self.optim_config.scheduler == "constant":
            return optimizer
        scheduler = make_schedule(optimizer, self.optim_config, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints without the frozen towers -----------------------------------------------------------------

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> MSTCLIPIQAModule:
        """Lightning's `load_from_checkpoint` with ``weights_only=True`` unless told otherwise, after
        `read_checkpoint` has refused a damaged or tampered file with a `BadCheckpointError` naming it."""
        if isinstance(checkpoint_path, str | os.PathLike):  # a stream could not be read twice
            read_checkpoint(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **{"weights_only": True, **kwargs})

    def _frozen_prefixes(self) -> tuple[str, ...]:
        named = {module: name for name, module in self.named_modules()}
        return tuple(named[m] + "." for m in self.net.frozen_modules())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the trainable weights only (the config names the frozen towers) and the saved model the fit started
        from, for the model card."""
        if self.fine_tuned_from:
            checkpoint[FINE_TUNED_FROM] = self.fine_tuned_from
        prefixes = self._frozen_prefixes()
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(prefixes)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put back the frozen towers this module loaded from its config, so strict loading still checks the rest,
        and move an old checkpoint's MOS scale to where the network holds it."""
        self.fine_tuned_from = checkpoint.get(FINE_TUNED_FROM, self.fine_tuned_from)
        prefixes = self._frozen_prefixes()
        state = checkpoint["state_dict"]
        if LEGACY_MOS_RANGE_KEY in state:
            state[MOS_RANGE_KEY] = state.pop(LEGACY_MOS_RANGE_KEY)
        for key, value in self.state_dict().items():
            if key.startswith(prefixes):
                state.setdefault(key, value)


def _quiet_lightning_notices() -> None:
    """Lightning's notices that do not apply to this module, silenced once one is made."""
    # The frozen towers are in eval mode on purpose; Lightning's generic notice about it would only alarm users.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # Under DDP every rank computes the evaluation metrics from all ranks' gathered pairs, so they are already the
    # same everywhere; Lightning's advice to log them with sync_dist=True would only average identical values.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|test)/(srcc|plcc|krcc|rmse)")
