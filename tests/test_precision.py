"""Mixed precision: bf16-mixed trains and evaluates on CPU, 16-mixed on a CUDA GPU, and whatever the autocast dtype
the metrics receive float32 predictions and compute in float32 or better."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from scipy import stats
from scripts.runs import METRICS, embedding_rows
from torch.utils.data import DataLoader

from mst_clipiqa.data.datamodule import IQADataModule
from mst_clipiqa.model import ModelConfig
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule, OptimConfig

CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="16-mixed (float16 autocast with a gradient scaler) is for CUDA GPUs; on CPU Lightning runs bf16-mixed",
)
AUTOCAST_DTYPE = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class Recording(MSTCLIPIQAModule):
    """Records the dtype of the network's scores and, before each validation's compute, what the metrics hold."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.score_dtypes: set[torch.dtype] = set()
        self.held: dict[str, list[torch.Tensor]] = {}

    def forward(self, batch):
        out = super().forward(batch)
        self.score_dtypes.add(out.score.dtype)
        return out

    def on_validation_epoch_end(self) -> None:
        self.held = {
            name: [*metric.preds, *metric.target]
            for name, metric in self.val_metrics.items()
            if name.endswith(("srcc", "plcc"))
        }
        super().on_validation_epoch_end()


@pytest.mark.parametrize("variant", ["template", "prompt"])
@pytest.mark.parametrize(
    ("precision", "accelerator"), [("bf16-mixed", "cpu"), pytest.param("16-mixed", "cuda", marks=CUDA)]
)
def test_mixed_precision_trains_and_the_metrics_get_float32(tiny_clip, tmp_path, variant, precision, accelerator):
    torch.manual_seed(0)
    module = Recording(
        net=ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1], variant=variant, tau_init=3.0)
    )
    module.net.set_mos_range(0.0, 5.0)
    data = embedding_rows(24)
    trainer = L.Trainer(
        max_epochs=1, accelerator=accelerator, devices=1, precision=precision, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, DataLoader(data[:16], batch_size=8), DataLoader(data[16:], batch_size=4))
    assert math.isfinite(trainer.callback_metrics["train/loss"])
    (results,) = trainer.validate(module, DataLoader(data, batch_size=8), verbose=False)

    # Autocast reaches head B's output; head A computes in float32 on purpose (tau * cosine in bf16 is too coarse).
    assert module.score_dtypes == ({torch.float32} if variant == "template" else {AUTOCAST_DTYPE[precision]})
    held = module.held["val/srcc"]
    assert held and {t.dtype for t in held} == {torch.float32}
    preds, mos = torch.cat(held[: len(held) // 2]).cpu().double(), torch.cat(held[len(held) // 2 :]).cpu().double()
    assert len(preds) == len(data)
    assert results["val/srcc"] == pytest.approx(stats.spearmanr(preds, mos).statistic, abs=1e-6)
    assert results["val/plcc"] == pytest.approx(stats.pearsonr(preds, mos).statistic, abs=1e-6)


def test_bf16_mixed_fit_and_test_on_the_demo_data(tiny_clip, demo_data, tmp_path):
    data = IQADataModule(
        source="agiqa-3k", root=demo_data, protocol="random",
        cache_dir=str(Path(demo_data).parent / "feature-cache"), batch_size=16, num_workers=0,
    ).follow(ModelConfig(tiny_clip[0], variant="prompt"))  # fmt: skip
    net = ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1], variant="prompt")
    module = MSTCLIPIQAModule(net=net, optim=OptimConfig(lr=3e-3))
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    validated = {name: float(trainer.callback_metrics[f"val/{name}"]) for name in METRICS}
    (tested,) = trainer.test(module, datamodule=data, ckpt_path="last", verbose=False)
    assert all(math.isfinite(value) for value in validated.values())
    assert all(math.isfinite(tested[f"test/{name}"]) for name in METRICS)
