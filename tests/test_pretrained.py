"""The shareable model format: save, load (folder, hub id, checkpoint), export, push, and fine-tuning from it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, default_collate

from mst_clipiqa.cli import main
from mst_clipiqa.data.datamodule import IQADataModule
from mst_clipiqa.lit_module import MSTCLIPIQAModule, OptimConfig
from mst_clipiqa.model import ModelConfig
from mst_clipiqa.pretrained import SavedModel, from_pretrained, push_to_hub, save_pretrained


def trained_module(clip: tuple[str, str], variant: str = "template", mos_range=(20.0, 80.0)) -> MSTCLIPIQAModule:
    """A module whose trainable weights differ from any fresh initialisation, as after training."""
    module = MSTCLIPIQAModule(net=ModelConfig(coarse_encoder=clip[0], fine_encoder=clip[1], variant=variant))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for part in (module.net.fusion, module.net.head):
            for param in part.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    module.set_mos_range(*mos_range)
    return module.eval()


def pixel_rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"pixel_values": torch.randn(3, 224, 224, generator=g), "mos": torch.rand((), generator=g) * 60 + 20,
         "index": i, "prompt": f"a scene with {i} red cubes"}
        for i in range(n)
    ]


def scores(module: MSTCLIPIQAModule, rows: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return module.to_mos(module(default_collate(rows)))


@pytest.mark.parametrize("variant", ["template", "prompt"])
def test_saved_folder_is_small_pickle_free_and_scores_bit_identically(tiny_clip, tmp_path, variant):
    module = trained_module(tiny_clip, variant)
    folder = save_pretrained(module, tmp_path / "model")

    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["variant"] == variant and config["mos_range"] == [20.0, 80.0]
    assert config["net"]["coarse_encoder"] == tiny_clip[0] and "revision" in config["net"]
    assert config["package_version"]
    weights = load_file(folder / "model.safetensors")
    assert weights and all(key.startswith(("fusion.", "head.")) for key in weights)

    loaded = from_pretrained(folder)
    rows = pixel_rows(5)
    assert torch.equal(scores(loaded, rows), scores(module, rows))
    assert loaded.net_config == module.net_config and not loaded.training


def test_real_width_template_model_is_under_3_mb(tiny_clip_512, tmp_path):
    folder = save_pretrained(trained_module(tiny_clip_512), tmp_path / "model")
    assert (folder / "model.safetensors").stat().st_size < 3e6


def test_checkpoint_loads_and_exports_like_the_module(tiny_clip, tmp_path, capsys):
    module = trained_module(tiny_clip, mos_range=(0.0, 5.0))
    rows = pixel_rows(8)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(rows, batch_size=4))
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    module.eval()

    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "exported")])
    assert "model.safetensors" in capsys.readouterr().out
    for source in (ckpt, tmp_path / "exported"):
        assert torch.equal(scores(from_pretrained(source), rows), scores(module, rows))


def test_hub_ids_go_to_snapshot_download_and_typos_do_not(tiny_clip, tmp_path, monkeypatch):
    folder = save_pretrained(trained_module(tiny_clip), tmp_path / "model")
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    saved = SavedModel.read("someone/mst-clipiqa-agiqa3k", revision="v1")
    assert saved.mos_range == (20.0, 80.0) and saved.source == "someone/mst-clipiqa-agiqa3k"
    ((repo_id, kwargs),) = calls
    assert repo_id == "someone/mst-clipiqa-agiqa3k" and kwargs["revision"] == "v1"
    assert set(kwargs["allow_patterns"]) == {"config.json", "model.safetensors"}

    for typo in ("./missing-model", "runs/x/checkpoints/best.ckpt", str(tmp_path / "nope")):
        with pytest.raises(FileNotFoundError, match="no such model"):
            SavedModel.read(typo)
    assert len(calls) == 1
    with pytest.raises(FileNotFoundError, match="no config.json"):
        SavedModel.read(tmp_path)


def test_push_to_hub_checks_the_folder_then_uploads(tiny_clip, tmp_path, monkeypatch):
    local = save_pretrained(trained_module(tiny_clip), tmp_path / "local")
    # The same weights, on encoders named by hub id (the saved folder is read, the encoders never loaded).
    folder = replace(SavedModel.read(local), net=ModelConfig()).save(tmp_path / "model")
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs["exist_ok"]))

        def upload_folder(self, **kwargs):
            calls.append(("upload", kwargs["repo_id"], Path(kwargs["folder_path"])))
            return type("Commit", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    assert push_to_hub(folder, "me/model", token="t") == "https://hub/commit/1"
    assert calls == [("token", "t"), ("create", "me/model", True), ("upload", "me/model", folder)]
    with pytest.raises(FileNotFoundError):
        push_to_hub(tmp_path, "me/model")
    with pytest.raises(ValueError, match="local encoder folders"):
        push_to_hub(local, "me/model")
    assert len(calls) == 3


def test_init_from_checks_that_the_network_matches(tiny_clip, tmp_path):
    folder = save_pretrained(trained_module(tiny_clip), tmp_path / "model")
    for change in ({"variant": "prompt"}, {"fine_encoder": tiny_clip[0]}, {"fusion_dim": 64}):
        net = ModelConfig(**{"coarse_encoder": tiny_clip[0], "fine_encoder": tiny_clip[1], **change})
        (name,) = change
        with pytest.raises(ValueError, match=f"differs in {name}: saved"):
            MSTCLIPIQAModule(net=net, init_from=str(folder))


def test_fine_tuning_starts_from_the_saved_weights_and_mos_range(tiny_clip, demo_data, tmp_path):
    saved = trained_module(tiny_clip, mos_range=(1.0, 4.0))
    folder = save_pretrained(saved, tmp_path / "model")
    net = ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1])
    module = MSTCLIPIQAModule(net=net, optim=OptimConfig(lr=1e-2), init_from=str(folder))
    start = {k: v.clone() for k, v in module.net.fusion.state_dict().items()}
    assert all(torch.equal(v, saved.net.fusion.state_dict()[k]) for k, v in start.items())
    assert module.mos_range.tolist() == [1.0, 4.0]
    assert "init_from" not in module.hparams  # a fine-tuned checkpoint reloads without the original model

    data = IQADataModule(source="agiqa-3k", root=demo_data, batch_size=16, num_workers=0,
                         preprocess_from=tiny_clip[0], features=False)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0)
    # The demo's MOS span about 0.1..4.9, beyond the saved model's 1..4.
    with pytest.warns(UserWarning, match="put the MOS on that scale"):
        trainer.fit(module, datamodule=data)
    assert module.mos_range.tolist() == [1.0, 4.0]
    after = module.net.fusion.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in start.items())
