"""The offline demo data set: AGIQA-3K's layout, determinism, reuse, and labels that make sense."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mst_clipiqa.data.preprocess import open_image
from mst_clipiqa.data.synthetic import HEADER, LEVELS, MARKER, make_demo_dataset


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "data.csv", newline="", encoding="utf-8") as table:
        return list(csv.DictReader(table))


def _level(row: dict[str, str]) -> int:
    return int(row["name"].split("_")[0].removeprefix("demo"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "agiqa3k")


def test_agiqa3k_layout(demo):
    assert (demo / "data.csv").read_text(encoding="utf-8").splitlines()[0] == (
        "name,prompt,adj1,adj2,style,mos_quality,std_quality,mos_align,std_align"
    )
    assert HEADER == tuple(_rows(demo)[0])
    rows = _rows(demo)
    assert len(rows) == 40 * LEVELS
    assert len({row["name"] for row in rows}) == len(rows)
    assert sorted(path.name for path in (demo / "images").iterdir()) == sorted(row["name"] for row in rows)


def test_images_decode_at_varied_sizes(demo):
    sizes = set()
    for row in _rows(demo):
        image = open_image(demo / "images" / row["name"])
        assert 256 <= min(image.size) and max(image.size) <= 320
        sizes.add(image.size)
    assert len(sizes) > 10
    suffixes = {row["name"].rsplit(".", 1)[1] for row in _rows(demo)}
    assert suffixes == {"jpg", "png"}


def test_labels(demo):
    rows = _rows(demo)
    assert all(row["prompt"].strip() and row["adj1"] and row["adj2"] and row["style"] for row in rows)
    for column in ("mos_quality", "std_quality", "mos_align", "std_align"):
        values = np.array([float(row[column]) for row in rows])
        assert values.min() >= 0 and values.max() <= 5
    quality = np.array([float(row["mos_quality"]) for row in rows])
    levels = np.array([_level(row) for row in rows])
    means = [quality[levels == level].mean() for level in range(LEVELS)]
    assert means[0] > 4.2 and all(a > b for a, b in zip(means, means[1:]))
    # Every level of a scene shares its prompt, as AGIQA-3K's generators share theirs.
    assert len({row["prompt"] for row in rows}) == 40


def test_misaligned_prompts_get_low_alignment(demo):
    rows = _rows(demo)
    misaligned = np.array(["_lowcorr_" in row["name"] for row in rows])
    align = np.array([float(row["mos_align"]) for row in rows])
    assert 0 < misaligned.mean() < 0.5
    assert align[misaligned].max() < align[~misaligned].min()


def test_deterministic_bytes(tmp_path):
    first = make_demo_dataset(tmp_path / "a", n_scenes=6, seed=3)
    second = make_demo_dataset(tmp_path / "b", n_scenes=6, seed=3)
    assert (first / "data.csv").read_bytes() == (second / "data.csv").read_bytes()
    for path in (first / "images").iterdir():
        assert path.read_bytes() == (second / "images" / path.name).read_bytes()
    other = make_demo_dataset(tmp_path / "c", n_scenes=6, seed=4)
    assert (other / "data.csv").read_bytes() != (first / "data.csv").read_bytes()


def test_scenes_do_not_depend_on_the_count(tmp_path):
    few = _rows(make_demo_dataset(tmp_path / "few", n_scenes=2))
    many = _rows(make_demo_dataset(tmp_path / "many", n_scenes=4))
    assert many[: len(few)] == few


def test_complete_folder_is_reused_and_changed_arguments_redraw(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", n_scenes=2)
    table = root / "data.csv"
    stamp = table.stat().st_mtime_ns
    assert make_demo_dataset(root, n_scenes=2) == root
    assert table.stat().st_mtime_ns == stamp
    make_demo_dataset(root, n_scenes=3)
    assert len(_rows(root)) == 3 * LEVELS
    assert json.loads((root / MARKER).read_text())["n_scenes"] == 3
    make_demo_dataset(root, n_scenes=1)
    assert sorted(path.name for path in (root / "images").iterdir()) == sorted(row["name"] for row in _rows(root))


def test_incomplete_folder_is_redrawn(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", n_scenes=2)
    missing = root / "images" / _rows(root)[3]["name"]
    missing.unlink()
    make_demo_dataset(root, n_scenes=2)
    assert missing.is_file()


def test_a_foreign_table_is_never_overwritten(tmp_path):
    (tmp_path / "data.csv").write_text("name,prompt\nreal.jpg,a real prompt\n")
    with pytest.raises(FileExistsError, match="not a demo data set"):
        make_demo_dataset(tmp_path, n_scenes=1)
    assert "real.jpg" in (tmp_path / "data.csv").read_text()
