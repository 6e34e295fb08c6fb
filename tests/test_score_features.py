"""`mst-clipiqa score --features true`: images whose embeddings the feature cache holds are neither decoded nor
encoded again, the scores do not change, and a fit's cache serves a scoring job of the same files."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import mst_clipiqa.data.preprocess as preprocess
import mst_clipiqa.scoring.scorer as scorer
from mst_clipiqa.data.features import TableFeatures, checkpoint_content
from mst_clipiqa.data.preprocess import ClipPreprocess
from mst_clipiqa.hub.pretrained import save_pretrained
from mst_clipiqa.model import MSTCLIPIQA, ModelConfig
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule


@pytest.fixture(scope="module")
def model(tiny_clip, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    module = MSTCLIPIQAModule(net=ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1]))
    module.net.set_mos_range(0.0, 5.0)
    return save_pretrained(module, tmp_path_factory.mktemp("model") / "template")


def images(folder: Path, count: int, bad: tuple[int, ...] = ()) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (48, 40 + i, 3), dtype=np.uint8)).save(path)
        if i in bad:
            path.write_bytes(path.read_bytes()[:60])
        paths.append(path)
    return paths


def scores(path: Path) -> list[tuple[str, float | None, bool]]:
    with path.open(newline="") as file:
        return [(row["image"], float(row["score"]) if row["score"] else None, bool(row["error"])) for row in
                csv.DictReader(file)]  # fmt: skip


def assert_same(got, want) -> None:
    assert [(name, error) for name, _, error in got] == [(name, error) for name, _, error in want]
    for (_, g, _), (_, w, _) in zip(got, want):
        assert (g is None) == (w is None) and (w is None or g == pytest.approx(w, abs=1e-5))


def score(model: Path, folder: Path, out: Path, **options) -> dict:
    return scorer.score_files(model, [str(folder)], out, accelerator="cpu", num_workers=0, batch_size=3, **options)


def test_a_second_job_reads_every_good_image_from_the_cache(model, tmp_path, monkeypatch):
    folder = tmp_path / "images"
    images(folder, 7, bad=(2,))
    plain = score(model, folder, tmp_path / "plain.csv")
    assert plain["cached"] == 0 and plain["scored"] == 6 and plain["failed"] == 1

    decoded = []
    real = preprocess.load_pixels
    monkeypatch.setattr(
        preprocess, "load_pixels", lambda image, *a, **k: decoded.append(image["path"]) or real(image, *a, **k)
    )
    cache = tmp_path / "cache"
    first = score(model, folder, tmp_path / "first.csv", features=True, cache_dir=cache)
    assert (first["scored"], first["failed"], first["cached"]) == (6, 1, 0)
    assert len(decoded) == 7
    assert_same(scores(tmp_path / "first.csv"), scores(tmp_path / "plain.csv"))
    assert len(list(cache.glob("image-*"))) == 2  # one namespace per tower

    decoded.clear()
    second = score(model, folder, tmp_path / "second.csv", features=True, cache_dir=cache)
    assert (second["scored"], second["failed"], second["cached"]) == (6, 1, 6)
    assert [Path(item).name for item in decoded] == ["img2.png"]  # only the bad image, to say why again
    assert_same(scores(tmp_path / "second.csv"), scores(tmp_path / "plain.csv"))

    # A rewritten file has another key: it is encoded again, not read stale.
    Image.fromarray(np.zeros((48, 41, 3), dtype=np.uint8)).save(folder / "img1.png")
    decoded.clear()
    third = score(model, folder, tmp_path / "third.csv", features=True, cache_dir=cache)
    assert third["cached"] == 5 and sorted(Path(item).name for item in decoded) == ["img1.png", "img2.png"]
    # Without --features the cache is neither read nor written.
    decoded.clear()
    assert score(model, folder, tmp_path / "fourth.csv")["cached"] == 0 and len(decoded) == 7


def test_the_cache_a_fit_filled_serves_the_exported_model_and_the_reverse(model, tiny_clip, tmp_path):
    folder = tmp_path / "images"
    paths = images(folder, 5)
    cache = tmp_path / "cache"
    # What a fit's encoding pass does, with the towers where the fit loads them: the saved model scores with copies
    # of them (encoders/ in its folder), which are the same checkpoints by content.
    table = datasets.Dataset.from_dict(
        {"image": [{"path": str(p), "bytes": None} for p in paths], "prompt": [None] * len(paths)},
        features=datasets.Features({"image": datasets.Image(decode=False), "prompt": datasets.Value("string")}),
    )
    net = MSTCLIPIQA(ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1]))
    assert not Path(scorer.from_pretrained(model).net.config.coarse_encoder).samefile(tiny_clip[0])
    encoded = TableFeatures(table, ClipPreprocess.from_pretrained(tiny_clip[0]), cache_dir=cache)
    assert encoded.prepare(range(len(paths)), net) == {}
    assert encoded.stats.images_encoded == 5

    report = score(model, folder, tmp_path / "cached.csv", features=True, cache_dir=cache)
    assert report["cached"] == 5
    assert_same(scores(tmp_path / "cached.csv"), scores_of(model, folder, tmp_path / "plain.csv"))

    # And a scoring job's embeddings serve a fit: a fresh table of the same files finds all of them.
    other = tmp_path / "other"
    images(other, 4)
    score(model, other, tmp_path / "other.csv", features=True, cache_dir=cache)
    table = table.cast_column("image", datasets.Image(decode=False)).select(range(4))
    table = table.map(lambda row, i: {"image": {"path": str(other / f"img{i}.png"), "bytes": None}}, with_indices=True)
    fit = TableFeatures(table, ClipPreprocess.from_pretrained(tiny_clip[0]), cache_dir=cache)
    fit.prepare(range(4), net)
    assert (fit.stats.images_cached, fit.stats.images_encoded) == (4, 0)


def scores_of(model: Path, folder: Path, out: Path):
    score(model, folder, out)
    return scores(out)


def test_a_checkpoint_is_hashed_once_and_a_changed_file_again(tiny_clip, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_clip[0], copy)
    hashed = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda stream, name: hashed.append(stream.name) or real(stream, name))
    root = tmp_path / "cache"
    original = checkpoint_content(tiny_clip[0], None, root=root)
    assert len(hashed) == 2  # config.json and model.safetensors
    assert checkpoint_content(str(copy), None, root=root) == original  # the same content, elsewhere
    hashed.clear()
    assert checkpoint_content(tiny_clip[0], None, root=root) == original and hashed == []  # remembered
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size; a new modification time
    weights.write_bytes(bytes(data))
    changed = checkpoint_content(str(copy), None, root=root)
    assert hashed == [str(weights)] and changed["files"] != original["files"]
