"""The offline demo end to end, and that training learns."""

from __future__ import annotations

import lightning as L
import torch
from scipy.stats import spearmanr

from mst_clipiqa.data.datamodule import IQADataModule
from mst_clipiqa.demo.run import run
from mst_clipiqa.model import ModelConfig
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule, OptimConfig


def test_demo_fit_and_test_end_to_end(tmp_path):
    results = run(tmp_path / "demo", extra=["--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false"],
                  n_scenes=12)
    for key in ("test/srcc", "test/plcc", "test/krcc", "test/rmse", "test/plcc_logistic"):
        assert key in results and torch.isfinite(torch.tensor(results[key]))
    run_dir = next((tmp_path / "demo" / "runs").rglob("splits.json")).parent
    assert (run_dir / "config.yaml").exists() or list((tmp_path / "demo" / "runs").rglob("config.yaml"))
    assert list(run_dir.rglob("last.ckpt"))


def train_srcc(trainer: L.Trainer, module: MSTCLIPIQAModule, data: IQADataModule) -> float:
    outputs = trainer.predict(module, datamodule=data)
    index = torch.cat([o["index"] for o in outputs])
    score = torch.cat([o["score"] for o in outputs])
    mos = torch.tensor(data.load_table()["mos_quality"])[index]
    return spearmanr(score, mos).statistic


def test_training_learns_on_the_demo_training_set(tiny_clip, demo_data, tmp_path):
    data = IQADataModule(source="agiqa-3k", root=demo_data, batch_size=16, num_workers=0, predict_split="train")
    data.follow(ModelConfig(tiny_clip[0]))
    net = ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1], tau_init=3.0)
    L.seed_everything(0)
    module = MSTCLIPIQAModule(net=net, optim=OptimConfig(lr=3e-3))
    trainer = L.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    data.setup("fit")
    module.net.set_mos_range(*data.mos_range)
    before = train_srcc(trainer, module, data)
    trainer.fit(module, datamodule=data)
    after = train_srcc(trainer, module, data)
    assert after > before + 0.3 and after > 0.5, (before, after)
