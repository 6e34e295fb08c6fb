"""The offline demo data set (AGIQA-3K's layout, determinism, reuse, labels that make sense), and the stand-ins of
the four benchmarks: read by the package's readers, sized as the releases, reused, never drawn over real data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import standins as standin_tool
from PIL import Image
from standins import RELEASE_IMAGES, STANDIN_FOLDERS, make_standins

from mst_clipiqa.data.checks import check_dataset
from mst_clipiqa.data.preprocess import open_image
from mst_clipiqa.data.splits import make_splits
from mst_clipiqa.data.tables import load_source
from mst_clipiqa.demo.synthetic import HEADER, LEVELS, MARKER, make_demo_dataset


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


# ---- stand-ins of the benchmarks -------------------------------------------------------------------------------------

SMALL = 0.001  # every benchmark at its floor: the least rows that keep its protocol's parts at 2 rows or more
SMALL_ROWS = {"agiqa-1k": 20, "agiqa-3k": 20, "aigciqa2023": 24, "aigiqa-20k": 20 + 2 + 4}


FIRST_FOUR = ["agiqa-1k", "agiqa-3k", "aigciqa2023", "aigiqa-20k"]  # EvalMi-50K, larger even at its floor, apart


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> standin_tool.StandIns:
    return make_standins(tmp_path_factory.mktemp("standins"), FIRST_FOUR, scale=SMALL, workers=2)


def test_full_size_plans_have_each_releases_counts_and_structure():
    # Planning draws nothing, so the real sizes are checked without writing 26,500 images.
    plans = {source: plan(np.random.default_rng(0), 1.0, False) for source, plan in standin_tool._PLANS.items()}
    sizes = {source: sum(map(len, plan.scenes)) for source, plan in plans.items()}
    assert sizes == RELEASE_IMAGES
    assert RELEASE_IMAGES == {
        "agiqa-1k": 1080,
        "agiqa-3k": 2982,
        "aigciqa2023": 2400,
        "aigiqa-20k": 20000,
        "evalmi-50k": 50400,
    }
    assert len(plans["evalmi-50k"].scenes) == 2100 and {len(s) for s in plans["evalmi-50k"].scenes} == {24}
    assert len(plans["agiqa-3k"].scenes) == 300  # prompts
    assert len(plans["aigciqa2023"].scenes) == 100 and {len(s) for s in plans["aigciqa2023"].scenes} == {24}
    parts = [shot.path.split("/")[0] for scene in plans["aigiqa-20k"].scenes for shot in scene]
    assert {part: parts.count(part) for part in set(parts)} == {"train": 14000, "val": 2000, "test": 4000}
    sides = {max(shot.size) for scene in plans["aigiqa-20k"].scenes for shot in scene}
    assert min(sides) == 512 and max(sides) == 1024
    # A twentieth keeps the releases' structure: 6 x prompts x 4 images for AIGCIQA2023, about 10 per prompt for
    # AGIQA-3K.
    twentieth = {source: plan(np.random.default_rng(0), 0.05, False) for source, plan in standin_tool._PLANS.items()}
    assert [sum(map(len, p.scenes)) for p in twentieth.values()] == [54, 149, 120, 1000, 2520]
    assert len(twentieth["agiqa-3k"].scenes) == 15 and len(twentieth["aigciqa2023"].scenes) == 5


def test_each_standin_is_read_by_its_reader(standins):
    assert set(standins.roots) == set(FIRST_FOUR) and standins.drawn == sum(SMALL_ROWS.values())
    assert standins.images == SMALL_ROWS
    for source, root in standins.roots.items():
        assert root.name == STANDIN_FOLDERS[source]
        ds = load_source(source, root)
        assert len(ds) == SMALL_ROWS[source]
        # Every image decodes, every row has its MOS and a prompt: nothing for the setup check to refuse.
        assert check_dataset(ds, target="quality", need_prompt=True) is ds
    aigc = load_source("aigciqa2023", standins.roots["aigciqa2023"])
    for column in ("mos_quality", "mos_alignment", "mos_authenticity"):
        assert all(20 < value < 80 for value in aigc[column])  # z-scores around 50, inside the configs' mos_range
    twenty = load_source("aigiqa-20k", standins.roots["aigiqa-20k"])
    assert [twenty["split"].count(part) for part in ("train", "val", "test")] == [20, 2, 4]
    (split,) = make_splits(twenty, "official")
    assert (len(split.train), len(split.val), len(split.test)) == (20, 2, 4)  # labelled val and test, as released later


def test_standin_images_have_the_releases_formats_and_sizes(standins):
    def formats(source: str) -> set[tuple[str, tuple[int, int]]]:
        found = set()
        for image in load_source(source, standins.roots[source])["image"]:
            with Image.open(image["path"]) as file:
                found.add((file.format, file.size))
        return found

    assert formats("agiqa-1k") == {("JPEG", (512, 512))}
    assert formats("agiqa-3k") <= {("PNG", (512, 512)), ("PNG", (1024, 1024))}
    assert formats("aigciqa2023") == {("PNG", (512, 512))}
    twenty = formats("aigiqa-20k")
    assert twenty <= {("PNG", size) for _, size in standin_tool.AIGIQA20K_GENERATORS.values()} and len(twenty) > 1


def test_evalmi50k_standin_is_read_by_its_reader(tmp_path):
    made = make_standins(tmp_path, ["evalmi-50k"], scale=SMALL, workers=2)
    root = made.roots["evalmi-50k"]
    assert root.name == STANDIN_FOLDERS["evalmi-50k"] and made.images == {"evalmi-50k": 240}  # 10 prompts x 24
    assert (root / "MOS&QA" / "AIGI2025_MOS_yn.xlsx").is_file() and (root / "MOS&QA" / "question.xlsx").is_file()
    ds = load_source("evalmi-50k", root)
    assert len(ds) == 240 and ds["name"][:2] == ["ali_flux_schnell/001.png", "DALLE3/001.png"]
    prompts = {name.split("/")[1]: prompt for name, prompt in zip(ds["name"], ds["prompt"])}
    assert len(set(prompts.values())) == 10  # one prompt per number, the same for all 24 generators
    assert all(prompts[name.split("/")[1]] == prompt for name, prompt in zip(ds["name"], ds["prompt"]))
    for column in ("mos_quality", "mos_alignment"):
        assert all(15 < value < 75 for value in ds[column])  # inside the configs' mos_range
    sides = {side for _, side in standin_tool.EVALMI50K_MODELS.values()}
    for image in ds["image"][:24]:
        with Image.open(image["path"]) as file:
            assert file.format == "PNG" and file.size[0] == file.size[1] in sides
    assert check_dataset(ds, target="alignment", need_prompt=True, check_images=False) is ds


def test_misdrawn_images_get_low_alignment(standins):
    ds = load_source("agiqa-3k", standins.roots["agiqa-3k"])
    lowcorr = np.array(["_lowcorr_" in name for name in ds["name"]])
    align = np.array(ds["mos_alignment"])
    assert lowcorr.any() and align[lowcorr].max() < align[~lowcorr].min()
    prompts = ds["prompt"]
    assert len(set(prompts)) == 10 and all(prompts.count(p) == 2 for p in set(prompts))  # AGIQA-3K's prompt groups


def test_a_complete_standin_is_reused_and_other_arguments_redraw(standins):
    folder = standins.roots["agiqa-1k"].parent
    xlsx = standins.roots["agiqa-1k"] / "AIGC_MOS_Zscore.xlsx"
    stamp = xlsx.stat().st_mtime_ns
    again = make_standins(folder, FIRST_FOUR, scale=SMALL, workers=2)
    assert again.drawn == 0 and again.images == standins.images and xlsx.stat().st_mtime_ns == stamp
    other = make_standins(folder, ["agiqa-1k"], scale=SMALL, seed=1, workers=1)
    assert other.drawn == 20 and xlsx.stat().st_mtime_ns != stamp


def test_withheld_labels_leave_the_official_val_and_test_for_prediction(tmp_path):
    roots = make_standins(tmp_path, ["aigiqa-20k"], scale=1e-4, withhold_labels=True, workers=1).roots
    root = roots["aigiqa-20k"]
    assert (root / "info_val.csv").read_text().splitlines()[0] == "name,prompt"
    assert (root / "info_train.csv").read_text().splitlines()[0] == "name,prompt,mos"
    ds = check_dataset(load_source("aigiqa-20k", root), target="quality", need_prompt=False)
    (split,) = make_splits(ds, "official")
    assert (len(split.train), len(split.val), len(split.test)) == (18, 2, 0)  # val carved from train's 20


def test_a_standin_never_overwrites_other_files(tmp_path):
    (tmp_path / "AGIQA-1K").mkdir()
    (tmp_path / "AGIQA-1K" / "AIGC_MOS_Zscore.xlsx").write_text("real data")
    with pytest.raises(FileExistsError, match="not a stand-in"):
        make_standins(tmp_path, ["agiqa-1k"], scale=SMALL)
    assert (tmp_path / "AGIQA-1K" / "AIGC_MOS_Zscore.xlsx").read_text() == "real data"


@pytest.mark.parametrize(
    ("sources", "scale", "message"), [(["agiqa-2k"], 1.0, "no stand-in"), (["agiqa-1k"], 0, "scale")]
)
def test_wrong_arguments_are_refused(tmp_path, sources, scale, message):
    with pytest.raises(ValueError, match=message):
        make_standins(tmp_path, sources, scale=scale)
