"""The LightningModule: frozen towers, optimiser, checkpoints without the towers."""

from __future__ import annotations

import math
from dataclasses import asdict, replace

import lightning as L
import pytest
import torch
from scripts.runs import embedding_rows
from torch.utils.data import DataLoader

from mst_clipiqa.data.datamodule import IQADataModule
from mst_clipiqa.errors import OptionError
from mst_clipiqa.hub.pretrained import SavedModel, save_pretrained
from mst_clipiqa.model import ModelConfig
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule, OptimConfig


def pixel_batches(n: int, seed: int = 0, prompts: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = [
        {
            "pixel_values": torch.randn(3, 224, 224, generator=g),
            "mos": torch.rand((), generator=g) * 5,
            "index": i,
            "prompt": f"scene number {i}",
        }
        for i in range(n)
    ]
    return rows


def make_module(clip, variant="template", **optim) -> MSTCLIPIQAModule:
    module = MSTCLIPIQAModule(
        net=ModelConfig(coarse_encoder=clip[0], fine_encoder=clip[1], variant=variant),
        optim=OptimConfig(**optim),
    )
    module.net.set_mos_range(0.0, 5.0)
    return module


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize("variant", ["template", "prompt"])
def test_checkpoint_holds_no_frozen_tower_and_reloads_bit_identical(tiny_clip_512, tmp_path, variant):
    module = make_module(tiny_clip_512, variant, lr=1e-2)
    rows = pixel_batches(12)
    t = trainer(tmp_path)
    t.fit(module, DataLoader(rows, batch_size=4), DataLoader(rows[:8], batch_size=4))
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)

    state = torch.load(path, weights_only=True)["state_dict"]
    assert state and not [k for k in state if k.startswith(("net.encoder.", "net.prompt_encoder."))]
    assert all(k.startswith(("net.fusion.", "net.head.", "net.mos_range")) for k in state)
    if variant == "template":
        assert path.stat().st_size < 12e6  # trainable weights + Adam moments; the towers alone would be ~1 GB

    module.eval()
    batch = torch.utils.data.default_collate(rows[:6])
    with torch.no_grad():
        before = module(batch).score
    loaded = MSTCLIPIQAModule.load_from_checkpoint(path, weights_only=True).eval()
    with torch.no_grad():
        after = loaded(batch).score
    assert torch.equal(before, after)
    assert loaded.net.mos_range.tolist() == [0.0, 5.0]
    assert loaded.net_config == module.net_config


def test_optimiser_gets_only_trainable_parameters(tiny_clip, tmp_path):
    module = make_module(tiny_clip, "prompt", name="adam", lr=5e-6, weight_decay=1e-3, scheduler="constant")
    module.trainer = trainer(tmp_path)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and not isinstance(optimizer, torch.optim.AdamW)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert optimised == trainable
    assert optimizer.param_groups[0]["lr"] == 5e-6 and optimizer.param_groups[0]["weight_decay"] == 1e-3


class LearningRates(L.Callback):
    """The learning rate each training step runs with."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_the_learning_rate_warms_up_from_zero_then_decays_on_a_cosine(tiny_clip, tmp_path):
    """transformers' get_cosine_schedule_with_warmup: lr * step / warmup over the warm-up steps, then
    lr * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2 down to zero at the end of the run."""
    module = make_module(tiny_clip, lr=1e-2, warmup_fraction=0.25)
    rates = LearningRates()
    trainer(tmp_path, callbacks=[rates]).fit(module, DataLoader(embedding_rows(20), batch_size=1))
    total, warmup = 20, 5

    def formula(step: int) -> float:
        if step < warmup:
            return 1e-2 * step / warmup
        return 1e-2 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2

    assert rates.rates == pytest.approx([formula(step) for step in range(total)], rel=1e-9, abs=1e-12)
    assert rates.rates[0] == 0.0 and rates.rates[warmup] == pytest.approx(1e-2)


def test_frozen_towers_stay_in_eval_mode_and_unchanged_by_training(tiny_clip, tmp_path):
    module = make_module(tiny_clip, "prompt", lr=1e-2)
    frozen_before = {k: v.clone() for k, v in module.state_dict().items() if k.startswith("net.encoder.")}
    trainable_before = {k: v.clone() for k, v in module.state_dict().items() if k.startswith("net.fusion.")}
    module.train()
    assert not module.net.encoder.training and not module.net.prompt_encoder.training
    rows = pixel_batches(8)
    trainer(tmp_path).fit(module, DataLoader(rows, batch_size=4), DataLoader(rows, batch_size=4))
    after = module.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen_before.items())
    assert any(not torch.equal(v, after[k]) for k, v in trainable_before.items())


def test_scores_come_back_on_the_data_sets_scale(tiny_clip):
    module = make_module(tiny_clip)
    module.net.set_mos_range(20.0, 80.0)
    mos = torch.tensor([20.0, 50.0, 80.0])
    torch.testing.assert_close(module.net.to_internal(mos), torch.tensor([1.0, 3.0, 5.0]))
    torch.testing.assert_close(module.net.to_mos(module.net.to_internal(mos)), mos)
    with pytest.raises(ValueError, match="must not all be equal"):
        module.net.set_mos_range(3.0, 3.0)


class ScaleData(L.LightningDataModule):
    """Pixel rows whose MOS lie on the scale `mos_range`, as `IQADataModule` reports it."""

    def __init__(self, mos_range: tuple[float, float]):
        super().__init__()
        self.mos_range = mos_range
        low, high = mos_range
        self.rows = [{**row, "mos": low + row["mos"] / 5 * (high - low)} for row in pixel_batches(8)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=4)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=4)


def test_fitting_maps_the_training_data_scale_and_evaluating_keeps_the_models(tiny_clip, tmp_path):
    module = make_module(tiny_clip, lr=1e-2)
    module.net.set_mos_range(1.0, 5.0)  # as if started from saved weights trained on 1..5
    trainer(tmp_path).fit(module, datamodule=ScaleData((0.0, 10.0)))
    assert module.net.mos_range.tolist() == [0.0, 10.0]
    trainer(tmp_path).test(module, datamodule=ScaleData((20.0, 80.0)), verbose=False)
    assert module.net.mos_range.tolist() == [0.0, 10.0]  # its scores stay on the scale it was trained on

    fresh = make_module(tiny_clip)
    fresh.net.mos_range.fill_(float("nan"))
    trainer(tmp_path).test(fresh, datamodule=ScaleData((20.0, 80.0)), verbose=False)
    assert fresh.net.mos_range.tolist() == [20.0, 80.0]


def test_init_from_takes_the_saved_network_where_the_config_keeps_the_defaults(tiny_clip, tmp_path):
    saved_net = ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1], fusion_dim=32, tau_init=3.0,
                            template="an image of {} quality")  # fmt: skip
    saved = MSTCLIPIQAModule(net=saved_net)
    saved.net.set_mos_range(1.0, 5.0)
    folder = save_pretrained(saved, tmp_path / "model")
    stored = SavedModel.read(folder).net

    module = MSTCLIPIQAModule(init_from=str(folder))
    assert module.net_config == stored and module.hparams["net"] == asdict(stored)
    assert torch.equal(module.net.fusion.gate.weight, saved.net.fusion.gate.weight)
    # A setting given otherwise stays; one that gives the weights their shape must then match.
    assert MSTCLIPIQAModule(net=ModelConfig(max_prompt_tokens=32), init_from=str(folder)).net_config == replace(
        stored, max_prompt_tokens=32
    )
    with pytest.raises(ValueError, match="differs in fusion_dim: saved 32, configured 64"):
        MSTCLIPIQAModule(net=ModelConfig(fusion_dim=64), init_from=str(folder))


def test_the_data_scale_is_the_mos_range_option_else_the_training_split(tiny_clip, demo_data):
    def data(**options) -> IQADataModule:
        data = IQADataModule(source="agiqa-3k", root=demo_data, features=False, num_workers=0, **options)
        return data.follow(ModelConfig(tiny_clip[0]))

    unset = data()
    low, high = unset.mos_range
    mos = unset.load_table().select(unset.split.train)["mos_quality"]
    assert (low, high) == (min(mos), max(mos)) and 0 < low and high < 5
    assert data(mos_range=(0, 5)).mos_range == (0.0, 5.0)
    with pytest.warns(UserWarning, match=r"beyond data.mos_range \[1, 4\]"):
        assert data(mos_range=(1, 4)).mos_range == (1.0, 4.0)
    with pytest.raises(OptionError, match=r"data.mos_range must be \[low, high\] with low < high, not \[5, 5\]"):
        data(mos_range=(5, 5))
