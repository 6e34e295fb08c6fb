"""The shareable model format: save, load (folder, hub id, checkpoint), export, push, and fine-tuning from it."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file, save_file
from scripts.models import trained_module
from torch.utils.data import DataLoader, default_collate

from mst_clipiqa import load_scorer
from mst_clipiqa.cli.commands import main
from mst_clipiqa.data.datamodule import IQADataModule
from mst_clipiqa.demo.tiny_clip import build_tiny_pair
from mst_clipiqa.errors import BadModelError
from mst_clipiqa.hub.pretrained import SavedModel, from_pretrained, push_to_hub, save_pretrained
from mst_clipiqa.losses import LossConfig
from mst_clipiqa.model import ModelConfig
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule, OptimConfig


def pixel_rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"pixel_values": torch.randn(3, 224, 224, generator=g), "mos": torch.rand((), generator=g) * 60 + 20,
         "index": i, "prompt": f"a scene with {i} red cubes"}
        for i in range(n)
    ]


def scores(module: MSTCLIPIQAModule, rows: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return module.net.to_mos(module(default_collate(rows)).score)


def own_copy(clip: tuple[str, str], folder: Path) -> tuple[str, str]:
    """A private copy of the tiny encoders, which a test may move or delete."""
    return tuple(str(shutil.copytree(path, folder / Path(path).name)) for path in clip)


def put_in_hub_cache(cache: Path, repo_id: str, checkpoint: str | Path, commit: str) -> None:
    """Store a checkpoint folder as `commit` of `repo_id` in a Hugging Face cache, and point main at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("variant", ["template", "prompt"])
def test_saved_folder_is_small_pickle_free_and_scores_bit_identically(tiny_clip, tmp_path, variant):
    module = trained_module(tiny_clip, variant)
    folder = save_pretrained(module, tmp_path / "model")

    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "encoders", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["variant"] == variant and config["mos_range"] == [20.0, 80.0]
    assert config["net"]["coarse_encoder"] == "encoders/coarse" and "revision" in config["net"]
    assert config["encoders"] == {"coarse": {"folder": "encoders/coarse"}, "fine": {"folder": "encoders/fine"}}
    assert config["package_version"]
    weights = load_file(folder / "model.safetensors")
    assert weights and all(key.startswith(("fusion.", "head.")) for key in weights)

    loaded = from_pretrained(folder)
    rows = pixel_rows(5)
    assert torch.equal(scores(loaded, rows), scores(module, rows))
    copies = {f"{stream}_encoder": str(folder.resolve() / "encoders" / stream) for stream in ("coarse", "fine")}
    assert loaded.net_config == replace(module.net_config, **copies) and not loaded.training


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


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_export_replaces_an_existing_model_folder_only_when_asked_and_never_half_way(tiny_clip, tmp_path, capsys):
    clip = own_copy(tiny_clip, tmp_path)
    module = trained_module(clip, mos_range=(0.0, 5.0))
    first, second = tmp_path / "first.ckpt", tmp_path / "second.ckpt"
    for checkpoint in (first, second):
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(module, DataLoader(pixel_rows(4), batch_size=4))
        trainer.save_checkpoint(checkpoint)
    out = tmp_path / "models" / "model"
    main(["export", "--ckpt_path", str(first), "--out", str(out)])
    kept = folder_bytes(out)

    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(second), "--out", str(out)])
    assert exit_info.value.code == 2
    assert f"--out {out} already exists: pass --overwrite true" in capsys.readouterr().err
    assert folder_bytes(out) == kept

    shutil.rmtree(clip[1])  # the second export fails when it copies the encoders: the folder stays as it was
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(second), "--out", str(out), "--overwrite", "true"])
    assert exit_info.value.code == 1 and folder_bytes(out) == kept
    shutil.copytree(tiny_clip[1], clip[1])
    main(["export", "--ckpt_path", str(second), "--out", str(out), "--overwrite", "true"])
    replaced = folder_bytes(out)
    assert replaced["model.safetensors"] != kept["model.safetensors"] and replaced.keys() == kept.keys()
    assert "# model" in replaced["README.md"].decode()  # the card names the folder, not the one it was written in
    assert [path.name for path in out.parent.iterdir()] == ["model"]  # nothing left beside it


@pytest.mark.parametrize("variant", ["template", "prompt"])
def test_files_written_before_the_network_held_the_mos_scale_score_the_same(tiny_clip, tmp_path, variant):
    """Checkpoints and folders in the layout written before the MOS scale moved into the network, made by hand: a
    checkpoint held it at the top of the LightningModule's state_dict ("mos_range", not "net.mos_range"); a folder
    held it in config.json, beside the trainable weights without the "net." prefix, as now."""
    module = trained_module(tiny_clip, variant)
    state = module.state_dict()
    trainable = {key: value for key, value in state.items() if key.startswith(("net.fusion.", "net.head."))}
    hyper_parameters = {"net": asdict(module.net_config), "loss": asdict(LossConfig()), "optim": asdict(OptimConfig())}
    checkpoint = tmp_path / "old.ckpt"
    torch.save({"epoch": 0, "global_step": 2, "pytorch-lightning_version": L.__version__,
                "state_dict": {"mos_range": torch.tensor([20.0, 80.0], dtype=torch.float64), **trainable},
                "hparams_name": "kwargs", "hyper_parameters": hyper_parameters}, checkpoint)  # fmt: skip

    folder = tmp_path / "old-folder"
    for stream, encoder in zip(("coarse", "fine"), tiny_clip):
        shutil.copytree(encoder, folder / "encoders" / stream)
    copies = {f"{stream}_encoder": f"encoders/{stream}" for stream in ("coarse", "fine")}
    config = {"format": "mst-clipiqa", "format_version": 2, "package_version": "0.1.0", "variant": variant,
              "mos_range": [20.0, 80.0], "net": {**asdict(module.net_config), **copies},
              "encoders": {stream: {"folder": f"encoders/{stream}"} for stream in ("coarse", "fine")}, "training": {}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({key.removeprefix("net."): value for key, value in trainable.items()}, folder / "model.safetensors")

    rows = pixel_rows(5)
    want = scores(module, rows)
    for loaded in (MSTCLIPIQAModule.load_from_checkpoint(checkpoint), from_pretrained(checkpoint),
                   from_pretrained(folder)):  # fmt: skip
        assert torch.equal(scores(loaded.eval(), rows), want)
        assert loaded.net.mos_range.tolist() == [20.0, 80.0]
    assert SavedModel.read(checkpoint).mos_range == (20.0, 80.0)


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
    assert set(kwargs["allow_patterns"]) == {"config.json", "model.safetensors", "encoders/*"}

    for typo in ("./missing-model", "runs/x/checkpoints/best.ckpt", str(tmp_path / "nope")):
        with pytest.raises(FileNotFoundError, match="no such model"):
            SavedModel.read(typo)
    assert len(calls) == 1
    with pytest.raises(BadModelError, match="no config.json"):
        SavedModel.read(tmp_path)


def test_push_to_hub_checks_the_folder_then_uploads_it_with_card_and_encoders(tiny_clip, tmp_path, monkeypatch):
    folder = save_pretrained(trained_module(tiny_clip), tmp_path / "model")
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs["exist_ok"]))

        def upload_folder(self, **kwargs):
            calls.append(("upload", kwargs["repo_id"], Path(kwargs["folder_path"]), kwargs["allow_patterns"]))
            return type("Commit", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert push_to_hub(folder, "me/model", token="t") == "https://hub/commit/1"
    *start, (_, repo_id, uploaded, patterns) = calls
    assert start == [("token", "t"), ("create", "me/model", True)] and (repo_id, uploaded) == ("me/model", folder)
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    assert "README.md" in files and "encoders/fine/model.safetensors" in files
    assert sorted(filter_repo_objects(files, allow_patterns=patterns)) == files  # everything, card and encoders

    with pytest.raises(BadModelError, match="no config.json"):
        push_to_hub(tmp_path, "me/model")
    # A folder of the first format, naming its local encoders by their paths outside it: nobody else has them.
    old = Path(shutil.copytree(folder, tmp_path / "old", ignore=shutil.ignore_patterns("encoders", "README.md")))
    config = json.loads((old / "config.json").read_text())
    config.update(format_version=1, net=dict(config["net"], coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1]))
    del config["encoders"]
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadModelError, match="outside it"):
        push_to_hub(old, "me/model")
    assert len(calls) == 3


def test_push_command_says_in_one_line_why_it_cannot_push(tiny_clip, tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    folder = str(save_pretrained(trained_module(tiny_clip), tmp_path / "model"))

    def push(*args: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exit_info:
            main(["push", *args])
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        return exit_info.value.code, err.strip()

    assert constants.HF_HUB_OFFLINE  # the tests run offline
    assert push(folder, "me/model") == (1, "mst-clipiqa push: error: cannot push to me/model: HF_HUB_OFFLINE is set; "
                                           "unset it on a machine online")  # fmt: skip
    missing = push(str(tmp_path / "modle"), "me/model")[1]
    assert missing.endswith(f"no such model folder: {tmp_path / 'modle'} (export a checkpoint first: mst-clipiqa "
                            "export --help)")  # fmt: skip
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, as far as the command can tell; no token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    no_token = push(folder, "me/model")[1]
    assert no_token.endswith("no Hugging Face token; run `hf auth login` or set HF_TOKEN (a write token)")

    NOT_FOUND = SimpleNamespace(headers={}, status_code=404, request=None)  # what the hub's HTTP client answered

    class NoSuchRepo:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            raise RepositoryNotFoundError("404 Client Error", response=NOT_FOUND)

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr("huggingface_hub.HfApi", NoSuchRepo)
    status, said = push(folder, "nobody/model")
    assert status == 1 and "repo nobody/model not found, or the token may not write to it" in said


def test_exported_model_scores_offline_anywhere_without_its_original_encoders(
    tiny_clip, demo_data, tmp_path, monkeypatch, umask_022
):
    """Train on local encoders, test, export; copy the folder elsewhere, take the encoders away, and score from
    another working directory, offline: the same scores as before."""
    clip = own_copy(tiny_clip, tmp_path / "encoders")
    for path in clip:  # as transformers writes them: only the owner may read (checked below: the copies may not be so)
        os.chmod(Path(path) / "model.safetensors", 0o600)
    module = MSTCLIPIQAModule(net=ModelConfig(coarse_encoder=clip[0], fine_encoder=clip[1], tau_init=3.0),
                              optim=OptimConfig(lr=3e-3))
    data = IQADataModule(source="agiqa-3k", root=demo_data, batch_size=16, num_workers=0).follow(ModelConfig(clip[0]))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=CSVLogger(tmp_path / "run"), enable_progress_bar=False,
                        callbacks=[ModelCheckpoint(monitor="val/srcc", mode="max", save_last=True)],
                        enable_model_summary=False, default_root_dir=tmp_path / "run")
    trainer.fit(module, datamodule=data)
    (tested,) = trainer.test(module, datamodule=data, ckpt_path="best", verbose=False)
    best = Path(trainer.checkpoint_callback.best_model_path)
    images = sorted(str(path) for path in (Path(demo_data) / "images").iterdir())[:6]
    before = load_scorer(best, device="cpu").score(images)

    main(["export", "--ckpt_path", str(best), "--out", str(tmp_path / "exported")])
    model = Path(shutil.copytree(tmp_path / "exported", tmp_path / "elsewhere" / "my-model"))
    (tmp_path / "encoders").rename(tmp_path / "gone")
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    assert load_scorer("../elsewhere/my-model", device="cpu").score(images) == before

    # Every file readable by the group, as the umask says, whatever the mode of the original.
    exported = tmp_path / "exported"
    modes = {path.relative_to(exported).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in exported.rglob("*")}
    assert "encoders/coarse/model.safetensors" in modes and "encoders/coarse/vocab.json" in modes
    assert all(mode == (0o755 if (exported / name).is_dir() else 0o644) for name, mode in modes.items()), modes

    # The card: metadata, the target and MOS scale, the data and split, and the test metrics of these weights.
    card = ModelCard.load(model / "README.md")
    assert card.data.library_name == "mst-clipiqa" and "image-quality-assessment" in card.data.tags
    assert card.data.base_model is None  # local encoders: nothing on the hub to name
    low, high = SavedModel.read(model).mos_range
    assert f"from **{low:g}** (low) to **{high:g}** (high)" in card.text
    assert "perceptual quality MOS" in card.text and "| source | `agiqa-3k` |" in card.text
    assert "| root | `agiqa3k-demo` |" in card.text and "| split_index | `0` |" in card.text
    assert f"| srcc | {tested['test/srcc']:.4f} |" in card.text and f"`{best.name}`" in card.text
    assert 'load_scorer("my-model")' not in card.text and 'load_scorer("exported")' in card.text


def test_separate_test_run_gives_the_card_the_metrics_of_the_exported_checkpoint(tiny_clip, tmp_path):
    """`mst-clipiqa test --ckpt_path X` logs into a version folder of its own; the card of X finds it there."""
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    module = trained_module(tiny_clip, mos_range=(0.0, 5.0))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(pixel_rows(4), batch_size=4))
    for name in ("best-epoch00.ckpt", "last.ckpt"):
        trainer.save_checkpoint(checkpoints / name)
    (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").write_text("epoch,step,test/srcc\n0,1,0.25\n")
    tested = tmp_path / "lightning_logs" / "version_1"
    tested.mkdir()
    (tested / "config.yaml").write_text("ckpt_path: lightning_logs/version_0/checkpoints/best-epoch00.ckpt\n")
    (tested / "metrics.csv").write_text("epoch,step,test/plcc,test/srcc\n0,0,0.5,0.75\n")

    best = save_pretrained(from_pretrained(checkpoints / "best-epoch00.ckpt"), tmp_path / "unused")  # no card data
    assert "Not recorded." in (best / "README.md").read_text()
    best_card = SavedModel.read(checkpoints / "best-epoch00.ckpt").save(tmp_path / "best") / "README.md"
    last_card = SavedModel.read(checkpoints / "last.ckpt").save(tmp_path / "last") / "README.md"
    assert "Test metrics of these weights (`test` run in `version_1`)" in best_card.read_text()
    assert "| plcc | 0.5000 |" in best_card.read_text() and "| srcc | 0.7500 |" in best_card.read_text()
    assert "training run's folder `version_0` (it does not record which checkpoint" in last_card.read_text()
    assert "| srcc | 0.2500 |" in last_card.read_text()


def test_missing_or_damaged_parts_are_named(tiny_clip, tmp_path):
    clip = own_copy(tiny_clip, tmp_path / "encoders")
    folder = save_pretrained(trained_module(clip), tmp_path / "model")

    broken = Path(shutil.copytree(folder, tmp_path / "no-fine"))
    shutil.rmtree(broken / "encoders" / "fine")
    missing = broken.resolve() / "encoders" / "fine"
    with pytest.raises(BadModelError, match=f"fine encoder is missing.* in {re.escape(str(missing))};"):
        from_pretrained(broken)
    broken = Path(shutil.copytree(folder, tmp_path / "bad-config"))
    (broken / "config.json").write_text("{")
    with pytest.raises(BadModelError, match=re.escape(f"{broken / 'config.json'} is damaged")):
        from_pretrained(broken)
    broken = Path(shutil.copytree(folder, tmp_path / "bad-weights"))
    (broken / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])
    with pytest.raises(BadModelError, match=re.escape(f"{broken / 'model.safetensors'} is missing or damaged")):
        from_pretrained(broken)

    # A checkpoint names its encoders by path; once they are gone it says which and where, never asking the hub.
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"hyper_parameters": {"net": vars(ModelConfig(coarse_encoder=clip[0], fine_encoder=clip[1]))},
                "state_dict": {"mos_range": torch.tensor([0.0, 5.0], dtype=torch.float64)}}, checkpoint)
    shutil.rmtree(tmp_path / "encoders")
    with pytest.raises(BadModelError, match=re.escape(f"coarse encoder {clip[0]} does not exist")):
        from_pretrained(checkpoint)
    with pytest.raises(BadModelError, match=re.escape(f"coarse encoder {clip[0]} does not exist")):
        SavedModel.read(checkpoint).save(tmp_path / "exported")
    assert from_pretrained(folder).net_config.coarse_encoder == str(folder.resolve() / "encoders" / "coarse")


def test_a_shared_encoder_is_copied_once_and_saving_again_in_place_keeps_it(tiny_clip, tmp_path):
    folder = save_pretrained(trained_module((tiny_clip[0], tiny_clip[0])), tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config["encoders"] == {"coarse": {"folder": "encoders/coarse"}, "fine": {"folder": "encoders/coarse"}}
    assert sorted(p.name for p in (folder / "encoders").iterdir()) == ["coarse"]
    loaded = from_pretrained(folder)
    save_pretrained(loaded, folder)
    rows = pixel_rows(3)
    assert torch.equal(scores(from_pretrained(folder), rows), scores(loaded, rows))


def test_hub_encoders_are_recorded_by_id_and_commit_and_load_at_that_commit(tiny_clip, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    ids, trained, later = ("test-org/clip-b32", "test-org/clip-b16"), "1" * 40, "2" * 40
    for repo_id, path in zip(ids, tiny_clip):
        put_in_hub_cache(cache, repo_id, path, trained)
    module = trained_module(ids)
    folder = save_pretrained(module, tmp_path / "model")

    config = json.loads((folder / "config.json").read_text())
    assert config["encoders"] == {stream: {"hub_id": repo_id, "commit": trained} for stream, repo_id in
                                  zip(("coarse", "fine"), ids)}
    assert config["net"]["coarse_encoder"] == ids[0] and not (folder / "encoders").exists()
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == list(ids) and f"`{trained}`" in card.text

    # main moves on to other weights; the folder still loads the commit it was trained on.
    for repo_id, path in zip(ids, build_tiny_pair(tmp_path / "retrained", seed=7)):
        put_in_hub_cache(cache, repo_id, path, later)
    loaded = from_pretrained(folder)
    rows = pixel_rows(4)
    assert torch.equal(scores(loaded, rows), scores(module, rows))
    assert Path(loaded.net_config.coarse_encoder).name == trained
    main_now = MSTCLIPIQAModule(net=ModelConfig(coarse_encoder=ids[0], fine_encoder=ids[1]))
    pixels = default_collate(rows)["pixel_values"]
    assert not torch.equal(main_now.net.encoder(pixels)[0], loaded.net.encoder(pixels)[0])
    # Saved again, it names the same ids and commits (not the cache folders it was loaded from).
    again = json.loads((save_pretrained(loaded, tmp_path / "again") / "config.json").read_text())
    assert again["encoders"] == config["encoders"]

    shutil.rmtree(cache / "models--test-org--clip-b32" / "snapshots" / trained)
    with pytest.raises(BadModelError, match=f"coarse encoder {ids[0]} at commit {trained} is not in the Hugging Face"):
        from_pretrained(folder)


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
    assert module.net.mos_range.tolist() == [1.0, 4.0]
    assert "init_from" not in module.hparams  # a fine-tuned checkpoint reloads without the original model

    data = IQADataModule(source="agiqa-3k", root=demo_data, batch_size=16, num_workers=0, features=False)
    data.follow(ModelConfig(tiny_clip[0]))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0)
    # The demo's MOS span about 0.1..4.9, beyond the saved model's 1..4: training maps the data's range onto the head.
    trainer.fit(module, datamodule=data)
    assert module.net.mos_range.tolist() == list(data.mos_range)
    # Its card says what it was fine-tuned from, saved directly or exported from a checkpoint.
    trainer.save_checkpoint(tmp_path / "fine-tuned.ckpt")
    main(["export", "--ckpt_path", str(tmp_path / "fine-tuned.ckpt"), "--out", str(tmp_path / "exported")])
    for folder in (save_pretrained(module, tmp_path / "fine-tuned"), tmp_path / "exported"):
        card = (folder / "README.md").read_text()
        assert "Fine-tuned from `model`, a local model" in card, card
        assert json.loads((folder / "config.json").read_text())["training"]["fine_tuned_from"] == {"name": "model"}
    saved = SavedModel.read(tmp_path / "exported")  # as if it had been fine-tuned from a hub model
    saved.training["fine_tuned_from"] = {"hub_id": "org/base", "name": "org/base"}
    card = ModelCard((saved.save(tmp_path / "from-hub") / "README.md").read_text())
    assert "Fine-tuned from [`org/base`](https://huggingface.co/org/base)" in card.text
    assert card.data.base_model == ["org/base"]
    after = module.net.fusion.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in start.items())
