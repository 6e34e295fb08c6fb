"""The split files shipped in experiments/splits/: each is what the protocol makes from the names it holds, each
benchmark config has one, and they stay small; one is read by a data module through --data.splits_file."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml
from release_fixtures import make_table_release, synthetic_dataset

from mst_clipiqa.data.datamodule import IQADataModule
from mst_clipiqa.data.splits import (
    load_splits,
    make_splits,
    read_shipped_text,
    remake_shipped_splits,
    save_shipped_splits,
)

SPLITS = Path(__file__).parents[2] / "experiments" / "splits"
SHIPPED = sorted(SPLITS.glob("*.json.xz"))
# The names each release lists: AGIQA-1K less the name it lists twice, the others in full.
NAMES = {
    "agiqa-1k": (1078, r"(deepai|dreamStudio)_\d+_\d+_[01]_[01]\.jpg"),
    "agiqa-3k": (2982, r"(AttnGAN|DALLE2|glide|midjourney|sd1\.5|xl2\.2)_(normal|lowstep|highcorr|lowcorr)_\d{3}\.jpg"),
    "aigciqa2023": (2400, r"(Controlnet|DALLE|Glide|Lafite|stable-diffusion|Unidiffuser)/\d{3}-[1-4]\.png"),
    "evalmi-50k": (50400, r"[\w.-]+/\d{3,4}\.png"),
}


def generator():
    spec = importlib.util.spec_from_file_location("generate_splits", SPLITS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def content(path: Path) -> dict:
    return json.loads(read_shipped_text(path))


@pytest.mark.parametrize("path", SHIPPED, ids=[path.name for path in SHIPPED])
def test_a_shipped_file_is_what_its_protocol_makes_from_its_names(path):
    # The names (and prompt groups) are the releases' own; made again by today's make_splits, by the protocol and
    # arguments the file names, they give the file's text exactly.
    assert remake_shipped_splits(path) == read_shipped_text(path)
    shipped = content(path)
    count, pattern = NAMES[path.name.split("_")[0]]
    assert len(shipped["names"]) == count and all(re.fullmatch(pattern, name) for name in shipped["names"])
    # Every split uses every name once, with a test part.
    assert all(
        len(letters) == count and "-" not in letters and "s" in letters for letters in shipped["splits"].values()
    )


def test_every_benchmark_config_has_its_split_file_and_they_stay_small():
    files = generator().wanted()
    assert (
        {path.name for path in files}
        == {path.name for path in SHIPPED}
        == {
            "agiqa-1k_random.json.xz",
            "agiqa-3k_prompt.json.xz",
            "aigciqa2023_random.json.xz",
            "evalmi-50k_kfold.json.xz",
            "evalmi-50k_prompt.json.xz",
        }
    )
    for path, options in files.items():
        shipped = content(path)
        assert shipped["protocol"] == options["protocol"]
        wanted = {"target": "quality", "val_fraction": options["val_fraction"], "seed": options["seed"]}
        if options["protocol"] == "kfold":
            wanted["k"] = options["folds"]
        else:
            wanted |= {"n_splits": options["n_splits"], "train_fraction": options["train_fraction"]}
        assert shipped["arguments"] == wanted
    for config in (SPLITS.parent).glob("evalmi50k_*.yaml"):
        assert yaml.safe_load(config.read_text())["data"]["protocol"] == "kfold"  # the paper's 5 folds
    assert sum(path.stat().st_size for path in SHIPPED) < 200_000


def test_a_split_changed_by_hand_is_not_what_the_protocol_makes(tmp_path):
    ds = synthetic_dataset(60, n_groups=12)
    path = tmp_path / "prompt.json.xz"
    save_shipped_splits(make_splits(ds, "prompt", n_splits=3), path, ds)
    assert remake_shipped_splits(path) == read_shipped_text(path)
    shipped = content(path)
    letters = shipped["splits"]["prompt-1"]
    shipped["splits"]["prompt-1"] = letters.replace("s", "t", 1)
    (tmp_path / "edited.json").write_text(json.dumps(shipped, separators=(",", ":")) + "\n")
    assert remake_shipped_splits(tmp_path / "edited.json") != read_shipped_text(tmp_path / "edited.json")


def test_a_shipped_file_is_read_through_the_data_modules_splits_file(tmp_path):
    rows = [(f"images/{i:02d}.png", f"prompt {i % 5}", float(i % 7)) for i in range(30)]
    table = make_table_release(tmp_path, rows)
    ds = synthetic_dataset(30, n_groups=5)
    ds = ds.map(lambda row, i: {"name": rows[i][0]}, with_indices=True)
    splits = make_splits(ds, "kfold", k=3)
    save_shipped_splits(splits, tmp_path / "shipped.json.xz", ds)

    data = IQADataModule(
        source="table",
        root=str(table),
        source_options={"mos_columns": {"quality": "mos"}, "prompt_column": "prompt"},
        splits_file=str(tmp_path / "shipped.json.xz"),
        check_images=False,
    )
    loaded = data.all_splits()
    names = data.load_table()["name"]
    assert [s.name for s in loaded] == ["kfold-0", "kfold-1", "kfold-2"]
    for made, read in zip(splits, loaded):
        for part in ("train", "val", "test"):
            assert {ds["name"][row] for row in getattr(made, part)} == {names[row] for row in getattr(read, part)}
    assert load_splits(tmp_path / "shipped.json.xz", data.load_table())[2].test == loaded[2].test


def test_a_damaged_split_file_is_named(tmp_path):
    (tmp_path / "bad.json.xz").write_bytes(b"not xz")
    with pytest.raises(ValueError, match=r"bad.json.xz: not a .xz file"):
        load_splits(tmp_path / "bad.json.xz", synthetic_dataset(4))
