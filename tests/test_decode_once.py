"""Each image is decoded once per feature cache: the encoding pass is the setup check of the images the cache lacks,
and an image the cache holds (same file, same key) is not decoded again, by any later fit, test or split."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning as L
import pytest

from mst_clipiqa.data import checks, preprocess
from mst_clipiqa.data.checks import check_dataset
from mst_clipiqa.data.datamodule import IQADataModule
from mst_clipiqa.data.tables import load_source
from mst_clipiqa.errors import BadImageError
from mst_clipiqa.model import ModelConfig
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """Names of the images fully decoded, by the setup check or the encoding pass (both go through `open_image`)."""
    names: list[str] = []
    real = preprocess.open_image

    def counting(source, **kwargs):
        names.append(Path(source["path"]).name)
        return real(source, **kwargs)

    monkeypatch.setattr(preprocess, "open_image", counting)
    monkeypatch.setattr(checks, "open_image", counting)
    return names


@pytest.fixture
def root(demo_data, tmp_path) -> Path:
    return Path(shutil.copytree(demo_data, tmp_path / "data"))


def fit(root: Path, folder: Path, tiny_clip, **options) -> IQADataModule:
    """One epoch of a fit through a Trainer, as `mst-clipiqa fit` runs it; returns the data module."""
    module = MSTCLIPIQAModule(net=ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1]))
    data = IQADataModule(
        source="agiqa-3k",
        root=str(root),
        protocol="prompt",
        batch_size=16,
        num_workers=0,
        cache_dir=str(root.parent / "cache"),
        **options,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
    )
    trainer.fit(module, datamodule=data)
    return data


def test_a_cold_fit_decodes_each_image_once_and_a_warm_one_none(root, tmp_path, tiny_clip, decoded):
    n = len(load_source("agiqa-3k", root))
    first = fit(root, tmp_path / "first", tiny_clip)
    assert sorted(decoded) == sorted({*decoded}) and len(decoded) == n  # the check and the encoding, once each
    assert (first.images_checked, first.features.stats.images_decoded, first.features.stats.images_encoded) == (0, n, n)

    decoded.clear()
    second = fit(root, tmp_path / "second", tiny_clip)
    assert decoded == []
    stats = second.features.stats
    assert (second.images_checked, stats.images_decoded, stats.images_cached) == (0, 0, n)
    assert (tmp_path / "first" / "splits.json").read_text() == (tmp_path / "second" / "splits.json").read_text()

    changed = Path(second.load_table()[5]["image"]["path"])
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    third = fit(root, tmp_path / "third", tiny_clip)
    assert decoded == [changed.name]
    assert (third.features.stats.images_encoded, third.features.stats.images_cached) == (1, n - 1)


def test_without_features_the_setup_check_decodes_every_image(root, tiny_clip, decoded):
    data = IQADataModule(source="agiqa-3k", root=str(root), features=False).follow(ModelConfig(tiny_clip[0]))
    data.setup("fit")
    assert data.images_checked == len(data.load_table()) == len(decoded)


def test_a_broken_image_the_cache_lacks_is_found_by_the_encoding_pass(root, tmp_path, tiny_clip, decoded):
    fit(root, tmp_path / "warm", tiny_clip)  # every good image in the cache
    table = load_source("agiqa-3k", root)
    broken = Path(table[7]["image"]["path"])
    broken.write_bytes(broken.read_bytes()[:200])  # truncated: a new size, so a new key

    decoded.clear()
    with pytest.raises(BadImageError) as error:
        fit(root, tmp_path / "error", tiny_clip)
    message = str(error.value)
    assert f"{table[7]['name']} (row 8)" in message and "1 bad rows of" in message and str(broken) in message
    assert decoded == [broken.name]  # the others come from the cache

    decoded.clear()
    dropped = fit(root, tmp_path / "drop", tiny_clip, on_bad="drop")
    assert decoded == [broken.name]
    assert len(dropped.load_table()) == len(table) - 1 and table[7]["name"] not in dropped.load_table()["name"]
    expected = tmp_path / "expected.csv"
    check_dataset(table, target="quality", need_prompt=False, on_bad="drop", report_path=expected)
    assert (tmp_path / "drop" / "dropped_rows.csv").read_text() == expected.read_text()

    # A cold cache drops the same row and makes the same splits.
    shutil.rmtree(root.parent / "cache")
    cold = fit(root, tmp_path / "cold", tiny_clip, on_bad="drop")
    assert cold.features.stats.images_encoded == len(table) - 1
    assert (tmp_path / "cold" / "splits.json").read_text() == (tmp_path / "drop" / "splits.json").read_text()
    assert (tmp_path / "cold" / "dropped_rows.csv").read_text() == expected.read_text()


def test_without_the_setup_check_a_broken_image_stops_the_encoding_with_its_name(root, tmp_path, tiny_clip):
    table = load_source("agiqa-3k", root)
    for row in (2, 9):
        Path(table[row]["image"]["path"]).write_bytes(b"not an image")
    with pytest.raises(BadImageError, match="2 images do not decode") as error:
        fit(root, tmp_path / "run", tiny_clip, check_images=False)
    assert all(f"{table[row]['name']} (row {row + 1})" in str(error.value) for row in (2, 9))
