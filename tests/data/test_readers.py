"""The readers: the five official releases, any table, Hugging Face datasets, and `load_source`."""

from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import scipy.io
from release_fixtures import (
    AGIQA1K_ROWS,
    AGIQA3K_ROWS,
    AIGCIQA2023_HUB_ROWS,
    AIGIQA20K_TEST,
    AIGIQA20K_TRAIN,
    AIGIQA20K_VAL,
    EVALMI50K_PROMPTS,
    EVALMI50K_ROWS,
    aigciqa2023_mos,
    make_agiqa1k,
    make_agiqa3k,
    make_aigciqa2023,
    make_aigciqa2023_hub,
    make_aigiqa20k,
    make_evalmi50k,
    write_image,
    write_table,
)

from mst_clipiqa.data.checks import check_dataset
from mst_clipiqa.data.releases import (
    AIGCIQA2023_MODELS,
    load_agiqa1k,
    load_agiqa3k,
    load_aigciqa2023,
    load_aigiqa20k,
    load_evalmi50k,
)
from mst_clipiqa.data.schema import FEATURES, target_column
from mst_clipiqa.data.tables import SOURCES, Columns, _embedded_names, load_hf, load_source, load_table
from mst_clipiqa.errors import BadRowError, OptionError


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


@pytest.mark.parametrize(
    ("layout", "first_prompt", "prompts_header"),
    [("models", 0, False), ("models", 1, False), ("pic-index", 0, False), ("flat", 0, False), ("models", 0, True)],
)
def test_aigciqa2023_maps_rows_to_model_prompt_and_image(tmp_path, layout, first_prompt, prompts_header):
    per_model = 8
    root = make_aigciqa2023(
        tmp_path, per_model=per_model, layout=layout, first_prompt=first_prompt, prompts_header=prompts_header
    )
    ds = load_aigciqa2023(root)

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


def test_aigciqa2023_prompts_without_a_header_keep_their_first_row(tmp_path):
    # As the release holds it: no header, the first row (Basic | Animals | a corgi) is the first prompt.
    make_aigciqa2023(tmp_path, per_model=8)
    rows = [("Basic", "Animals", "a corgi"), ("Basic", "People", "a girl")]
    write_table(tmp_path / "AIGCIQA2023_Prompts.xlsx", pd.DataFrame(rows), header=False)

    prompts = load_aigciqa2023(tmp_path)["prompt"]

    assert prompts[:8] == ["a corgi"] * 4 + ["a girl"] * 4
    assert prompts[8:16] == prompts[:8]  # the next model, the same prompts


@pytest.mark.parametrize("image_dir", [".", "images"])
def test_aigciqa2023_reads_a_hub_copy_data_csv(tmp_path, image_dir):
    ds = load_aigciqa2023(make_aigciqa2023_hub(tmp_path, image_dir=image_dir))

    got = [(r["name"], r["prompt"], r["mos_quality"], r["mos_alignment"], r["mos_authenticity"]) for r in rows_of(ds)]
    assert got == AIGCIQA2023_HUB_ROWS
    assert image_paths(ds) == [(tmp_path / image_dir / row[0]).resolve() for row in AIGCIQA2023_HUB_ROWS]
    assert check_dataset(ds, target="alignment", need_prompt=True, num_threads=2) is ds


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


@pytest.mark.parametrize(("labels_dir", "image_dir"), [("MOS&QA", "."), (".", "images"), ("MOS&QA", "EvalMi-50K")])
def test_evalmi50k_reads_perception_correspondence_and_the_prompt_of_each_number(tmp_path, labels_dir, image_dir):
    ds = load_evalmi50k(make_evalmi50k(tmp_path, labels_dir=labels_dir, image_dir=image_dir))

    rows = rows_of(ds)
    assert [(r["name"], r["mos_quality"], r["mos_alignment"]) for r in rows] == EVALMI50K_ROWS
    # <NNN> names the NNN-th prompt row, counted from 1.
    assert [r["prompt"] for r in rows] == [EVALMI50K_PROMPTS[int(name[-7:-4]) - 1] for name, _, _ in EVALMI50K_ROWS]
    assert rows[2]["prompt"] == rows[5]["prompt"] == "prompt of row 10"
    assert all(r["source"] == "evalmi-50k" and r["mos_authenticity"] is None for r in rows)
    assert image_paths(ds) == [(tmp_path / image_dir / name).resolve() for name, _, _ in EVALMI50K_ROWS]
    assert check_dataset(ds, target="alignment", need_prompt=True, num_threads=2) is ds


def test_evalmi50k_refuses_image_numbers_without_a_prompt_row(tmp_path):
    make_evalmi50k(tmp_path)
    labels = pd.DataFrame([("DALLE3/001.png", 50.0, 50.0), ("DALLE3/011.png", 40.0, 40.0), ("DALLE3/x.png", 1.0, 2.0)])
    write_table(tmp_path / "MOS&QA" / "AIGI2025_MOS_yn.xlsx", labels.set_axis(["ImageName", "MOS1", "MOS2"], axis=1))

    with pytest.raises(BadRowError, match=r"2 image names .* row of .*question.xlsx \(1 to 10\)") as err:
        load_evalmi50k(tmp_path)
    assert "DALLE3/011.png (row 2)" in str(err.value) and "DALLE3/x.png (row 3)" in str(err.value)


def test_evalmi50k_without_labels_names_the_file(tmp_path):
    make_evalmi50k(tmp_path)
    (tmp_path / "MOS&QA" / "question.xlsx").unlink()
    with pytest.raises(FileNotFoundError, match="no question.xlsx"):
        load_evalmi50k(tmp_path)


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

    columns = Columns(
        image_column="file",
        mos_columns={"quality": "quality", "correspondence": "align"},
        prompt_column="text",  # matched case-insensitively
        group_column="family",
        split_column="part",
    )
    ds = load_table(path, columns, source="pku-i2iqa")

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
    columns = Columns(image_column="file", mos_columns={"quality": "quality"}, image_root=tmp_path / "data")
    ds = load_table(path, columns)
    assert image_paths(ds)[0] == (tmp_path / "data" / "imgs" / "a.png").resolve()
    assert ds["prompt"] == ds["group"] == [None, None, None]


def test_table_reader_refuses_bad_mappings(tmp_path):
    path = write_table(tmp_path / "labels.csv", TABLE)
    with pytest.raises(BadRowError, match=r"labels.csv: no column\(s\) mos"):
        load_table(path, Columns(image_column="file", mos_columns={"quality": "mos"}))
    with pytest.raises(ValueError, match="unknown target 'beauty'"):
        load_table(path, Columns(image_column="file", mos_columns={"beauty": "quality"}))
    with pytest.raises(ValueError, match="two targets to mos_alignment"):
        load_table(path, Columns(image_column="file", mos_columns={"alignment": "align", "correspondence": "quality"}))


def test_table_reader_refuses_rows_without_an_image(tmp_path):
    path = write_table(tmp_path / "labels.csv", TABLE.assign(file=["a.png", "", "c.png"]))
    with pytest.raises(BadRowError, match=r"labels.csv: 1 rows without an image name \(rows numbered from 1, header "
                       r"not counted\); fill them in or remove them:\n  row 2$"):  # fmt: skip
        load_table(path, Columns(image_column="file", mos_columns={"quality": "quality"}))


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

    columns = Columns(image_column="picture", mos_columns={"quality": "score"}, prompt_column="caption")
    ds = load_hf(tmp_path / "saved", columns)

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

    ds = load_source("hf", saved, Columns(mos_columns={"quality": "mos"}))

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

    ds = load_source("hf", root, Columns(mos_columns={"quality": "mos"}))

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

    columns = Columns(image_column="path", mos_columns={"authenticity": "mos"}, name_column="id")
    ds = load_hf(tmp_path / "saved", columns)

    assert rows_of(ds)[0]["name"] == "first"
    assert rows_of(ds)[0]["mos_authenticity"] == 2.5
    assert image_paths(ds) == [(tmp_path / "saved" / "imgs" / "a.png").resolve()]
    datasets.DatasetDict({"train": saved}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match="no split 'test'"):
        load_hf(tmp_path / "dict", Columns(split="test", image_column="path", mos_columns={"quality": "mos"}))


def test_load_source_dispatches_and_lists_the_known_kinds(tmp_path):
    make_agiqa3k(tmp_path)
    assert load_source("agiqa-3k", tmp_path)["name"] == load_agiqa3k(tmp_path)["name"]
    with pytest.raises(ValueError, match="data.source 'agiqa-5k' is unknown; expected one of agiqa-1k, agiqa-3k"):
        load_source("agiqa-5k", tmp_path)
    assert set(SOURCES) == {"agiqa-1k", "agiqa-3k", "aigciqa2023", "aigiqa-20k", "evalmi-50k", "table", "hf"}


def test_releases_take_no_column_mapping_and_tables_need_one(tmp_path):
    make_agiqa3k(tmp_path)
    with pytest.raises(OptionError, match=r"^data.source agiqa-3k reads its release's own files and takes no data"):
        load_source("agiqa-3k", tmp_path, Columns(mos_columns={"quality": "mos_quality"}))
    path = write_table(tmp_path / "labels.csv", TABLE)
    with pytest.raises(OptionError, match=r"^data.source table needs data.source_options: at least mos_columns"):
        load_source("table", path)
    with pytest.raises(OptionError, match="split 'test' chooses a split of a Hugging Face dataset"):
        load_source("table", path, Columns(image_column="file", mos_columns={"quality": "quality"}, split="test"))


def test_target_names():
    assert target_column("correspondence") == target_column("alignment") == "mos_alignment"
    assert target_column("mos_quality") == "mos_quality"
    with pytest.raises(ValueError, match="unknown target"):
        target_column("beauty")
