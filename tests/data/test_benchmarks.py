import csv
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import scipy.io
from benchmark_fixtures import (
    AGIQA1K_ROWS,
    AGIQA3K_ROWS,
    AIGIQA20K_TEST,
    AIGIQA20K_TRAIN,
    AIGIQA20K_VAL,
    THREE_BAD_REASONS,
    aigciqa2023_mos,
    make_agiqa1k,
    make_agiqa3k,
    make_aigciqa2023,
    make_aigiqa20k,
    make_table_release,
    make_three_bad_rows,
    write_bomb_png,
    write_image,
    write_table,
    write_truncated,
)
from PIL import Image
from scripts.runs import subprocess_env

from mst_clipiqa.data.benchmarks import (
    AIGCIQA2023_MODELS,
    FEATURES,
    SOURCES,
    _embedded_names,
    check_dataset,
    load_agiqa1k,
    load_agiqa3k,
    load_aigciqa2023,
    load_aigiqa20k,
    load_hf,
    load_source,
    load_table,
    target_column,
)
from mst_clipiqa.demo import DEMO_CONFIG
from mst_clipiqa.errors import BadImageError, BadRowError


def rows_of(ds: datasets.Dataset) -> list[dict]:
    return ds.select_columns([c for c in ds.column_names if c != "image"]).to_list()


def image_paths(ds: datasets.Dataset) -> list[Path]:
    return [Path(image["path"]) for image in ds["image"]]


# ---------------------------------------------------------------------------------------------------------------------
# Official releases
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_dir", ["file", ".", "AGIQA-1k-Database/file"])
def test_agiqa1k_reads_the_zscore_xlsx_and_finds_the_images(tmp_path, image_dir):
    ds = load_agiqa1k(make_agiqa1k(tmp_path, image_dir=image_dir))

    assert ds.features == FEATURES
    rows = rows_of(ds)
    assert [(r["name"], r["prompt"], r["mos_quality"]) for r in rows] == AGIQA1K_ROWS
    assert all(r["group"] == r["prompt"] and r["source"] == "agiqa-1k" and r["split"] is None for r in rows)
    assert all(r["mos_alignment"] is None and r["mos_authenticity"] is None for r in rows)
    folder = (tmp_path / image_dir).resolve()
    assert image_paths(ds) == [folder / name for name, _, _ in AGIQA1K_ROWS]
    assert all(image["bytes"] is None for image in ds["image"])


def test_agiqa1k_without_images_says_where_it_looked(tmp_path):
    make_agiqa1k(tmp_path, image_dir="file")
    (tmp_path / "file").rename(tmp_path / "elsewhere")
    for image in (tmp_path / "elsewhere").iterdir():
        image.rename(image.with_suffix(".png"))

    with pytest.raises(FileNotFoundError, match="AIGC_MOS_Zscore.xlsx.*none of its 4 images") as info:
        load_agiqa1k(tmp_path)
    assert str(tmp_path / "elsewhere") in str(info.value)


def test_agiqa1k_without_annotations_names_the_file(tmp_path):
    make_agiqa1k(tmp_path).joinpath("AIGC_MOS_Zscore.xlsx").unlink()
    with pytest.raises(FileNotFoundError, match="AIGC_MOS_Zscore.xlsx"):
        load_agiqa1k(tmp_path)


@pytest.mark.parametrize("image_dir", [".", "img", "images"])
def test_agiqa3k_reads_both_mos_and_finds_each_layout(tmp_path, image_dir):
    ds = load_agiqa3k(make_agiqa3k(tmp_path, image_dir=image_dir))

    rows = rows_of(ds)
    assert [r["name"] for r in rows] == [row[0] for row in AGIQA3K_ROWS]
    assert [r["prompt"] for r in rows] == [row[1] for row in AGIQA3K_ROWS]
    assert [r["mos_quality"] for r in rows] == [row[5] for row in AGIQA3K_ROWS]
    assert [r["mos_alignment"] for r in rows] == [row[7] for row in AGIQA3K_ROWS]
    assert {r["source"] for r in rows} == {"agiqa-3k"}
    assert all(path.parent == (tmp_path / image_dir).resolve() and path.is_file() for path in image_paths(ds))


def test_agiqa3k_wrong_header_names_the_file_and_the_expected_header(tmp_path):
    make_agiqa3k(tmp_path)
    frame = pd.read_csv(tmp_path / "data.csv").rename(columns={"mos_align": "alignment"})
    frame.to_csv(tmp_path / "data.csv", index=False)
    with pytest.raises(BadRowError, match=r"data\.csv: no column\(s\) mos_align.*expected: name, prompt, adj1"):
        load_agiqa3k(tmp_path)


@pytest.mark.parametrize(("layout", "first_prompt"), [("models", 0), ("models", 1), ("pic-index", 0), ("flat", 0)])
def test_aigciqa2023_maps_rows_to_model_prompt_and_image(tmp_path, layout, first_prompt):
    per_model = 8
    ds = load_aigciqa2023(make_aigciqa2023(tmp_path, per_model=per_model, layout=layout, first_prompt=first_prompt))

    n = per_model * len(AIGCIQA2023_MODELS)
    assert len(ds) == n
    mos = aigciqa2023_mos(n)
    rows = rows_of(ds)
    for i, row in enumerate(rows):
        model, prompt, k = AIGCIQA2023_MODELS[i // per_model], (i % per_model) // 4, i % 4 + 1
        expected = {
            "models": f"{model}/{prompt + first_prompt:03d}-{k}.png",
            "pic-index": f"{model}/img{i}.png",
            "flat": f"allimg/{i}.png",
        }[layout]
        assert row["name"] == expected
        assert row["prompt"] == row["group"] == f"prompt number {prompt}"
        # mosz1 is quality, mosz2 authenticity, mosz3 correspondence.
        assert (row["mos_quality"], row["mos_authenticity"], row["mos_alignment"]) == (
            mos["mosz1.mat"][i],
            mos["mosz2.mat"][i],
            mos["mosz3.mat"][i],
        )
    assert all(path.is_file() for path in image_paths(ds))
    assert image_paths(ds)[0] == (tmp_path / "Image" / rows[0]["name"]).resolve()
    # Every model's folder holds the same file names: names keep the folder, and no row is refused.
    assert check_dataset(ds, target="quality", need_prompt=True, num_threads=2) is ds


def test_aigciqa2023_rejects_a_row_count_that_does_not_fit_six_models(tmp_path):
    make_aigciqa2023(tmp_path)
    scipy.io.savemat(tmp_path / "DATA" / "MOS" / "mosz1.mat", {"MOSz": np.ones((50, 1))})
    with pytest.raises(BadRowError, match=r"MOS files differ in length \(mosz1.mat: 50, mosz2.mat: 48"):
        load_aigciqa2023(tmp_path)
    for file in ("mosz1.mat", "mosz2.mat", "mosz3.mat"):
        scipy.io.savemat(tmp_path / "DATA" / "MOS" / file, {"MOSz": np.ones((50, 1))})
    with pytest.raises(BadRowError, match="mosz1.mat: 50 rows; expected a multiple of 24"):
        load_aigciqa2023(tmp_path)


def test_aigciqa2023_rejects_prompts_that_do_not_match_the_rows(tmp_path):
    make_aigciqa2023(tmp_path, per_model=8)
    write_table(tmp_path / "AIGCIQA2023_Prompts.xlsx", pd.DataFrame({"Style": ["a"], "Object": ["b"], "prompt": ["c"]}))
    with pytest.raises(BadRowError, match="AIGCIQA2023_Prompts.xlsx: 1 prompts.*need 2"):
        load_aigciqa2023(tmp_path)


@pytest.mark.parametrize("suffix", [".csv", ".xlsx"])
@pytest.mark.parametrize("header", [True, False])
def test_aigiqa20k_reads_the_official_split_with_or_without_header(tmp_path, header, suffix):
    ds = load_aigiqa20k(make_aigiqa20k(tmp_path, header=header, suffix=suffix))

    rows = rows_of(ds)
    expected = (
        [(name, prompt, mos, "train") for name, prompt, mos in AIGIQA20K_TRAIN]
        + [(name, prompt, None, "val") for name, prompt in AIGIQA20K_VAL]
        + [(name, prompt, None, "test") for name, prompt in AIGIQA20K_TEST]
    )
    assert [(r["name"], r["prompt"], r["mos_quality"], r["split"]) for r in rows] == expected
    assert [path.parent.name for path in image_paths(ds)] == [split for *_, split in expected]
    assert all(path.is_file() for path in image_paths(ds))


def test_aigiqa20k_file_names_shared_by_two_split_folders_keep_apart(tmp_path):
    make_aigiqa20k(tmp_path)
    shared = AIGIQA20K_TRAIN[0][0]
    write_table(tmp_path / "info_test.csv", pd.DataFrame([(shared, "a forest")], columns=["name", "prompt"]))
    write_image(tmp_path / "test" / shared, shade=9)

    ds = load_aigiqa20k(tmp_path)

    assert ds["name"][0] == f"train/{shared}" and ds["name"][-1] == f"test/{shared}"
    assert ds["name"][1:-1] == [name for name, *_ in AIGIQA20K_TRAIN[1:] + AIGIQA20K_VAL]
    assert check_dataset(ds, target="quality", need_prompt=True, num_threads=2) is ds


def test_aigiqa20k_wrong_header_is_refused(tmp_path):
    make_aigiqa20k(tmp_path)
    write_table(tmp_path / "info_train.csv", pd.DataFrame(AIGIQA20K_TRAIN, columns=["image", "text", "score"]))
    with pytest.raises(BadRowError, match=r"info_train.csv: no column\(s\) name, prompt, mos"):
        load_aigiqa20k(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Generic tables and Hugging Face datasets
# ---------------------------------------------------------------------------------------------------------------------

TABLE = pd.DataFrame(
    {
        "file": ["imgs/a.png", "imgs/b.png", "imgs/c.png"],
        "Text": ["one", "two", "three"],
        "quality": [1.5, 2.5, 3.5],
        "align": [4.0, 3.0, 2.0],
        "family": ["x", "x", "y"],
        "part": ["train", "validation", "test"],
    }
)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet", ".xlsx"])
def test_table_reader_reads_every_format(tmp_path, suffix):
    for i, image in enumerate(TABLE["file"]):
        write_image(tmp_path / image, shade=i)
    path = write_table(tmp_path / f"labels{suffix}", TABLE)

    ds = load_table(
        path,
        image_column="file",
        mos_columns={"quality": "quality", "correspondence": "align"},
        prompt_column="text",  # matched case-insensitively
        group_column="family",
        split_column="part",
        source="pku-i2iqa",
    )

    rows = rows_of(ds)
    assert [r["name"] for r in rows] == list(TABLE["file"])
    assert [r["prompt"] for r in rows] == list(TABLE["Text"])
    assert [r["mos_quality"] for r in rows] == list(TABLE["quality"])
    assert [r["mos_alignment"] for r in rows] == list(TABLE["align"])
    assert [r["group"] for r in rows] == ["x", "x", "y"]
    assert [r["split"] for r in rows] == ["train", "val", "test"]
    assert {r["source"] for r in rows} == {"pku-i2iqa"}
    assert image_paths(ds) == [(tmp_path / image).resolve() for image in TABLE["file"]]


def test_table_reader_resolves_images_against_image_root(tmp_path):
    path = write_table(tmp_path / "tables" / "labels.csv", TABLE)
    ds = load_table(path, image_column="file", mos_columns={"quality": "quality"}, image_root=tmp_path / "data")
    assert image_paths(ds)[0] == (tmp_path / "data" / "imgs" / "a.png").resolve()
    assert ds["prompt"] == ds["group"] == [None, None, None]


def test_table_reader_refuses_bad_mappings(tmp_path):
    path = write_table(tmp_path / "labels.csv", TABLE)
    with pytest.raises(BadRowError, match=r"labels.csv: no column\(s\) mos"):
        load_table(path, image_column="file", mos_columns={"quality": "mos"})
    with pytest.raises(ValueError, match="unknown target 'beauty'"):
        load_table(path, image_column="file", mos_columns={"beauty": "quality"})
    with pytest.raises(ValueError, match="two targets to mos_alignment"):
        load_table(path, image_column="file", mos_columns={"alignment": "align", "correspondence": "quality"})


def test_table_reader_refuses_rows_without_an_image(tmp_path):
    path = write_table(tmp_path / "labels.csv", TABLE.assign(file=["a.png", "", "c.png"]))
    with pytest.raises(BadRowError, match=r"labels.csv: 1 rows without an image name \(rows numbered from 1, header "
                       r"not counted\); fill them in or remove them:\n  row 2$"):  # fmt: skip
        load_table(path, image_column="file", mos_columns={"quality": "quality"})


def test_hf_reader_takes_embedded_images_from_a_saved_dataset(tmp_path):
    source = [write_image(tmp_path / "src" / f"g{i}.png", shade=i) for i in range(3)]
    saved = datasets.Dataset.from_dict(
        {"picture": [str(p) for p in source], "caption": ["p0", "p1", "p2"], "score": [1.0, 2.0, 3.0]},
        features=datasets.Features(
            {"picture": datasets.Image(), "caption": datasets.Value("string"), "score": datasets.Value("float32")}
        ),
    )
    datasets.DatasetDict({"train": saved}).save_to_disk(str(tmp_path / "saved"))  # embeds the image bytes
    for path in source:
        path.unlink()

    ds = load_hf(tmp_path / "saved", image_column="picture", mos_columns={"quality": "score"}, prompt_column="caption")

    assert ds.features == FEATURES
    rows = rows_of(ds)
    assert [(r["name"], r["prompt"], r["mos_quality"], r["source"]) for r in rows] == [
        ("g0.png", "p0", 1.0, "hf"),
        ("g1.png", "p1", 2.0, "hf"),
        ("g2.png", "p2", 3.0, "hf"),
    ]
    assert all(image["bytes"] for image in ds["image"])
    assert check_dataset(ds, target="quality", need_prompt=True) is ds


def save_images(folder: Path, images: list[dict], mos: list[float]) -> Path:
    """A `datasets.Dataset` with an `Image` column (bytes, and the path each came from) saved to `folder`."""
    features = datasets.Features({"image": datasets.Image(), "mos": datasets.Value("float32")})
    datasets.Dataset.from_dict({"image": images, "mos": mos}, features=features).save_to_disk(str(folder))
    return folder


def test_hf_images_sharing_a_file_name_in_different_folders_keep_apart(tmp_path):
    # AIGCIQA2023 on the hub: every model's folder holds 000-1.png. Saving keeps only the file name, so the
    # rows that share one are told apart by their row number; a row without a path is named by its number.
    png = write_image(tmp_path / "one.png").read_bytes()
    paths = ["Image/DALLE/000-1.png", "Image/Glide/000-1.png", "Image/Glide/001-1.png", None]
    saved = save_images(tmp_path / "saved", [{"bytes": png, "path": path} for path in paths], [1.0, 2.0, 3.0, 4.0])

    ds = load_source("hf", saved, mos_columns={"quality": "mos"})

    assert ds["name"] == ["1/000-1.png", "2/000-1.png", "001-1.png", "4"]
    assert check_dataset(ds, target="quality", need_prompt=False, num_threads=2) is ds
    kept = check_dataset(ds, target="quality", need_prompt=False, on_bad="drop", report_path=tmp_path / "r.csv")
    assert kept is ds and not (tmp_path / "r.csv").exists()


def test_hf_image_folder_names_keep_the_folders_below_the_common_one(tmp_path, monkeypatch):
    # An image-folder dataset, read by `datasets.load_dataset` from its files: stored paths keep their folders.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    root = tmp_path / "AIGCIQA2023" / "Image"
    files = ["DALLE/000-1.png", "Glide/000-1.png", "Glide/001-1.png"]
    for i, file in enumerate(files):
        write_image(root / file, shade=i)
    pd.DataFrame({"file_name": files, "mos": [1.0, 2.0, 3.0]}).to_csv(root / "metadata.csv", index=False)

    ds = load_source("hf", root, mos_columns={"quality": "mos"})

    assert sorted(zip(ds["name"], ds["mos_quality"])) == [(file, i + 1.0) for i, file in enumerate(files)]
    assert check_dataset(ds, target="quality", need_prompt=False, num_threads=2) is ds


@pytest.mark.parametrize(
    ("paths", "names"),
    [
        (["/data/Image/DALLE/0.png", "/data/Image/Glide/0.png"], ["DALLE/0.png", "Glide/0.png"]),
        (["a/x/0.png", "a/y/0.png", "b/0.png"], ["a/x/0.png", "a/y/0.png", "b/0.png"]),
        (["0.png", "1.png", None, ""], ["0.png", "1.png", "3", "4"]),
        # Row 1's name would be row 3's path: then every row gets its number.
        (["a.png", "a.png", "1/a.png"], ["1/a.png", "2/a.png", "3/1/a.png"]),
    ],
)
def test_embedded_names_are_unique_paths_below_the_common_folder(paths, names):
    assert _embedded_names(paths) == names


def test_hf_reader_takes_path_columns_relative_to_the_saved_folder(tmp_path):
    saved = datasets.Dataset.from_dict({"path": ["imgs/a.png"], "mos": ["2.5"], "id": ["first"]})
    saved.save_to_disk(str(tmp_path / "saved"))
    write_image(tmp_path / "saved" / "imgs" / "a.png")

    ds = load_hf(tmp_path / "saved", image_column="path", mos_columns={"authenticity": "mos"}, name_column="id")

    assert rows_of(ds)[0]["name"] == "first"
    assert rows_of(ds)[0]["mos_authenticity"] == 2.5
    assert image_paths(ds) == [(tmp_path / "saved" / "imgs" / "a.png").resolve()]
    datasets.DatasetDict({"train": saved}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match="no split 'test'"):
        load_hf(tmp_path / "dict", split="test", image_column="path", mos_columns={"quality": "mos"})


def test_load_source_dispatches_and_lists_the_known_kinds(tmp_path):
    make_agiqa3k(tmp_path)
    assert load_source("agiqa-3k", tmp_path)["name"] == load_agiqa3k(tmp_path)["name"]
    with pytest.raises(ValueError, match="data.source 'agiqa-5k' is unknown; expected one of agiqa-1k, agiqa-3k"):
        load_source("agiqa-5k", tmp_path)
    assert set(SOURCES) == {"agiqa-1k", "agiqa-3k", "aigciqa2023", "aigiqa-20k", "table", "hf"}


def test_target_names():
    assert target_column("correspondence") == target_column("alignment") == "mos_alignment"
    assert target_column("mos_quality") == "mos_quality"
    with pytest.raises(ValueError, match="unknown target"):
        target_column("beauty")


# ---------------------------------------------------------------------------------------------------------------------
# Bad data: every case as an error naming the item, and as a drop with a report
# ---------------------------------------------------------------------------------------------------------------------

GOOD = [("images/a.png", "a cat", 1.0), ("images/b.png", "a dog", 2.0), ("images/c.png", "a cow", 3.0)]


def missing_file(root):
    (root / "images" / "b.png").unlink()
    return GOOD


def truncated(root):
    write_truncated(root / "images" / "b.png")
    return GOOD


def bomb(root):
    write_bomb_png(root / "images" / "b.png")
    return GOOD


def nan_mos(root):
    return [GOOD[0], ("images/b.png", "a dog", "nan"), GOOD[2]]


def text_mos(root):
    return [GOOD[0], ("images/b.png", "a dog", "n/a"), GOOD[2]]


def empty_mos(root):
    return [GOOD[0], ("images/b.png", "a dog", ""), GOOD[2]]


def missing_prompt(root):
    return [GOOD[0], ("images/b.png", "  ", 2.0), GOOD[2]]


def duplicate(root):
    return [*GOOD, ("images/b.png", "a dog", 4.0)]


# (corrupt the release, the error class, what the message says about images/b.png, how many rows go)
BAD_CASES = {
    "missing file": (missing_file, BadImageError, "image file not found", 1),
    "truncated image": (truncated, BadImageError, "cannot decode image", 1),
    "decompression bomb": (bomb, BadImageError, "decompression bomb", 1),
    "NaN MOS": (nan_mos, BadRowError, "mos_quality is missing", 1),
    "non-numeric MOS": (text_mos, BadRowError, "mos_quality 'n/a' is not a number", 1),
    "empty MOS": (empty_mos, BadRowError, "mos_quality is missing", 1),
    "missing prompt": (missing_prompt, BadRowError, "prompt is missing", 1),
    "duplicate name": (duplicate, BadRowError, "name listed 2 times", 2),
}


def bad_release(root, case):
    """The GOOD release with images/b.png broken as `case` says, read with load_table."""
    corrupt = BAD_CASES[case][0]
    for i, (image, _, _) in enumerate(GOOD):
        write_image(root / image, shade=i)
    path = write_table(root / "labels.csv", pd.DataFrame(corrupt(root), columns=["image", "prompt", "mos"]))
    return load_table(path, image_column="image", mos_columns={"quality": "mos"}, prompt_column="prompt")


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_is_an_error_naming_the_image(tmp_path, case):
    _, error, reason, _ = BAD_CASES[case]
    ds = bad_release(tmp_path, case)
    with pytest.raises(error, match=r"labels|table") as info:
        check_dataset(ds, target="quality", need_prompt=True, num_threads=2)
    message = str(info.value)
    assert "labels.csv: " in message and "(rows numbered from 1, header not counted)" in message
    listed = [line for line in message.split("\n")[1:] if line.startswith("  images/b.png (row ")]
    assert len(listed) == BAD_CASES[case][3] and all(reason in line for line in listed)
    assert listed[0].startswith("  images/b.png (row 2): ")
    assert "images/a.png" not in message


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_is_dropped_with_a_report(tmp_path, case, caplog):
    _, _, reason, n_bad = BAD_CASES[case]
    ds = bad_release(tmp_path, case)
    report = tmp_path / "out" / "bad.csv"

    with caplog.at_level(logging.WARNING, logger="mst_clipiqa.data.benchmarks"):
        kept = check_dataset(ds, target="quality", need_prompt=True, on_bad="drop", report_path=report)

    assert len(kept) == len(ds) - n_bad
    assert "images/b.png" not in kept["name"]
    assert f"{n_bad} bad rows of {len(ds)}" in caplog.text
    lines = list(csv.DictReader(report.open()))
    assert [line["name"] for line in lines] == ["images/b.png"] * n_bad
    assert all(reason in line["reason"] for line in lines)
    assert lines[0]["row"] == "2"


def test_bomb_below_twice_the_pixel_limit_is_caught_too(tmp_path, monkeypatch):
    # Pillow only warns between one and two times MAX_IMAGE_PIXELS; that warning must still count.
    for i, (image, _, _) in enumerate(GOOD):
        write_image(tmp_path / image, size=(8, 8) if i != 1 else (10, 10), shade=i)
    path = write_table(tmp_path / "labels.csv", pd.DataFrame(GOOD, columns=["image", "prompt", "mos"]))
    ds = load_table(path, image_column="image", mos_columns={"quality": "mos"})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 80)
    with pytest.raises(BadImageError, match=r"images/b.png \(row 2\).*decompression bomb"):
        check_dataset(ds, target="quality", need_prompt=False, num_threads=4)


def test_cells_the_reader_cannot_take_are_kept_as_written_for_the_check(tmp_path):
    make_table_release(tmp_path, GOOD)
    frame = pd.DataFrame(GOOD, columns=["image", "prompt", "mos"]).assign(
        mos=["1.0", "good", "3.0"], align=["4.0", "5.0", "n/a"], part=["train", "holdout", "test"]
    )
    path = write_table(tmp_path / "labels.csv", frame)
    mapping = {"quality": "mos", "alignment": "align"}

    ds = load_table(path, image_column="image", mos_columns=mapping, split_column="part")

    assert ds["mos_quality"] == [1.0, None, 3.0] and ds["split"] == ["train", None, "test"]
    assert ds["bad_cells"] == [
        None,
        {"mos_quality": "good", "mos_alignment": None, "mos_authenticity": None, "split": "holdout"},
        {"mos_quality": None, "mos_alignment": "n/a", "mos_authenticity": None, "split": None},
    ]
    with pytest.raises(BadRowError) as info:
        check_dataset(ds, target="quality", need_prompt=False)
    assert str(info.value).endswith(
        "\n  images/b.png (row 2): mos_quality 'good' is not a number; split 'holdout' is none of dev, test, train, "
        "val, valid, validation"
    )  # a bad cell of another target's column is no problem for this one
    kept = check_dataset(ds, target="quality", need_prompt=False, on_bad="drop", report_path=tmp_path / "r.csv")
    assert kept["name"] == ["images/a.png", "images/c.png"]
    assert "'good'" in (tmp_path / "r.csv").read_text()
    with pytest.raises(BadRowError, match=r"images/c.png \(row 3\): mos_alignment 'n/a' is not a number"):
        check_dataset(ds, target="alignment", need_prompt=False)


def test_every_problem_of_a_table_is_in_one_error_and_its_report(tmp_path):
    table = make_three_bad_rows(tmp_path)
    report = tmp_path / "run" / "dropped_rows.csv"
    ds = load_table(table, image_column="image", mos_columns={"quality": "mos"})

    with pytest.raises(BadRowError) as info:
        check_dataset(ds, target="quality", need_prompt=False, report_path=report)

    message = str(info.value)
    assert message.startswith(f"{table}: 3 bad rows of 5 (rows numbered from 1, header not counted); all are listed "
                              f"in {report}. Fix them, or set on_bad to \"drop\" (--data.on_bad drop)")  # fmt: skip
    listed = dict(re.findall(r"\n  images/\w\.png \(row (\d+)\): ([^\n]*)", message))
    assert listed.keys() == THREE_BAD_REASONS.keys()
    assert all(listed[row].startswith(reason) for row, reason in THREE_BAD_REASONS.items())
    lines = list(csv.DictReader(report.open()))
    assert {line["row"]: line["reason"] for line in lines} == listed
    assert [line["name"] for line in lines] == ["images/b.png", "images/c.png", "images/d.png"]
    assert "'n/a'" in lines[0]["reason"]


def test_one_error_names_rows_of_every_kind(tmp_path):
    rows = [
        ("images/a.png", "a cat", 1.0),
        ("images/b.png", "a dog", "n/a"),
        ("images/c.png", "a cow", "?"),
        ("images/d.png", "", 2.0),
        ("images/e.png", "a pig", 3.0),
        ("images/e.png", "a pig", 4.0),
        ("images/f.png", "a hen", 5.0),
    ]
    table = make_table_release(tmp_path, rows)
    write_truncated(tmp_path / "images" / "f.png")
    ds = load_table(table, image_column="image", mos_columns={"quality": "mos"}, prompt_column="prompt")

    with pytest.raises(BadRowError) as info:
        check_dataset(ds, target="quality", need_prompt=True, num_threads=2)

    *listed, broken = str(info.value).split("\n")[1:]
    assert listed == [
        "  images/b.png (row 2): mos_quality 'n/a' is not a number",
        "  images/c.png (row 3): mos_quality '?' is not a number",
        "  images/d.png (row 4): prompt is missing",
        "  images/e.png (row 5): name listed 2 times (rows 5, 6; mos_quality 3.0, 4.0)",
        "  images/e.png (row 6): name listed 2 times (rows 5, 6; mos_quality 3.0, 4.0)",
    ]
    assert broken.startswith("  images/f.png (row 7): cannot decode image")


def test_the_command_line_names_every_bad_row_once_and_leaves_the_report(tmp_path, tiny_clip):
    table = make_three_bad_rows(tmp_path / "data")
    run = tmp_path / "run"
    options = json.dumps({"image_column": "image", "mos_columns": {"quality": "mos"}})
    result = subprocess.run(
        [sys.executable, "-m", "mst_clipiqa", "fit", "--config", str(DEMO_CONFIG), "--data.source", "table",
         "--data.root", str(table), "--data.source_options", options, "--data.protocol", "random",
         "--model.net.coarse_encoder", tiny_clip[0], "--model.net.fine_encoder", tiny_clip[1],
         "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
         "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip

    assert result.returncode != 0
    (report,) = run.rglob("dropped_rows.csv")
    assert f"{table}: 3 bad rows of 5" in result.stderr and str(report) in result.stderr
    listed = re.findall(r"\n  images/\w\.png \(row (\d+)\): ([^\n]*)", result.stderr)
    assert [row for row, _ in listed] == list(THREE_BAD_REASONS)  # each once, in one message
    lines = list(csv.DictReader(report.open()))
    assert [(line["row"], line["reason"]) for line in lines] == listed
    assert "'n/a'" in lines[0]["reason"]


def test_agiqa1k_duplicate_listing_drops_both_copies(tmp_path):
    rows = [*AGIQA1K_ROWS, ("dreamStudio_8_9_1_1.jpg", "a bird", 2.0), ("dreamStudio_8_9_1_1.jpg", "a bird", 3.0)]
    ds = load_agiqa1k(make_agiqa1k(tmp_path, rows=rows))
    with pytest.raises(BadRowError, match=r"dreamStudio_8_9_1_1.jpg \(row 5\): name listed 2 times \(rows 5, 6;"):
        check_dataset(ds, target="quality", need_prompt=False)
    kept = check_dataset(ds, target="quality", need_prompt=False, on_bad="drop")
    assert kept["name"] == [name for name, _, _ in AGIQA1K_ROWS]


def test_withheld_labels_of_official_val_and_test_are_not_problems(tmp_path):
    ds = load_aigiqa20k(make_aigiqa20k(tmp_path))
    assert check_dataset(ds, target="quality", need_prompt=True) is ds
    # Without the official split the same missing MOS is a problem.
    unsplit = ds.map(lambda row: {"split": None})
    with pytest.raises(BadRowError, match="MJ_0003.png.*mos_quality is missing"):
        check_dataset(unsplit, target="quality", need_prompt=True, check_images=False)


def test_error_lists_the_first_problems_and_the_count(tmp_path):
    rows = [(f"images/{i:02d}.png", None, 1.0) for i in range(13)]
    ds = load_table(make_table_release(tmp_path, rows), image_column="image", mos_columns={"quality": "mos"})
    with pytest.raises(BadRowError) as info:
        check_dataset(ds, target="quality", need_prompt=True, report_path=tmp_path / "report.csv")
    message = str(info.value)
    assert "13 bad rows of 13" in message
    assert "images/09.png" in message and "images/10.png" not in message
    assert message.endswith("... and 3 more")
    assert len(list(csv.DictReader((tmp_path / "report.csv").open()))) == 13


def test_check_refuses_unknown_options(tmp_path):
    ds = load_agiqa3k(make_agiqa3k(tmp_path))
    with pytest.raises(ValueError, match="on_bad"):
        check_dataset(ds, target="quality", need_prompt=False, on_bad="ignore")
    with pytest.raises(ValueError, match="unknown target"):
        check_dataset(ds, target="beauty", need_prompt=False)
