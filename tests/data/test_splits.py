import json

import numpy as np
import pytest
from release_fixtures import synthetic_dataset

from mst_clipiqa.data.splits import (
    PROTOCOLS,
    Split,
    load_splits,
    make_splits,
    predict_indices,
    save_splits,
    split_settings,
)
from mst_clipiqa.errors import BadRowError


def names_of(ds, split: Split) -> tuple[set[str], set[str], set[str]]:
    names = ds["name"]
    return tuple({names[row] for row in getattr(split, part)} for part in ("train", "val", "test"))


def assert_partition(split: Split, rows: set[int]) -> None:
    train, val, test = set(split.train), set(split.val), set(split.test)
    assert not train & val and not train & test and not val & test
    assert train | val | test == rows
    assert list(split.train) == sorted(split.train)


def test_random_splits_are_deterministic_disjoint_and_covering():
    ds = synthetic_dataset(100)
    splits = make_splits(ds, "random", n_splits=3, seed=7)

    assert [s.name for s in splits] == ["random-0", "random-1", "random-2"]
    for split in splits:
        assert_partition(split, set(range(100)))
        # 80 rows for train+val, of which 10% validate; the test part is the other 20.
        assert (len(split.train), len(split.val), len(split.test)) == (72, 8, 20)
    assert splits == make_splits(ds, "random", n_splits=3, seed=7)
    assert splits[0].test != splits[1].test
    assert make_splits(ds, "random", n_splits=1, seed=8)[0].test == splits[1].test  # split i uses seed + i
    assert splits[0].arguments == {
        "target": "quality",
        "n_splits": 3,
        "train_fraction": 0.8,
        "val_fraction": 0.1,
        "seed": 7,
    }


def test_splits_do_not_depend_on_the_order_of_the_rows():
    ds = synthetic_dataset(60)
    shuffled = ds.select(np.random.default_rng(1).permutation(len(ds)))
    for protocol in ("random", "prompt", "kfold"):
        first, second = make_splits(ds, protocol, n_splits=2), make_splits(shuffled, protocol, n_splits=2)
        assert [names_of(ds, s) for s in first] == [names_of(shuffled, s) for s in second]


def test_prompt_splits_share_no_prompt():
    ds = synthetic_dataset(100, n_groups=20)
    groups = ds["group"]
    splits = make_splits(ds, "prompt", n_splits=4, seed=3)

    for split in splits:
        assert_partition(split, set(range(100)))
        train, val, test = ({groups[row] for row in getattr(split, part)} for part in ("train", "val", "test"))
        assert not train & val and not train & test and not val & test
        assert (len(train), len(val), len(test)) == (14, 2, 4)  # 16 of 20 prompts fit, 10% of those validate
    assert splits == make_splits(ds, "prompt", n_splits=4, seed=3)
    assert len({s.test for s in splits}) == 4


def test_prompt_splits_need_a_group_for_every_row():
    ds = synthetic_dataset(10).map(lambda row, i: {"group": None if i == 4 else row["group"]}, with_indices=True)
    with pytest.raises(BadRowError, match="1 rows have no group.*img004.png"):
        make_splits(ds, "prompt")


def test_kfold_tests_each_row_exactly_once():
    ds = synthetic_dataset(53)
    splits = make_splits(ds, "kfold", k=5, val_fraction=0.2, seed=1)

    assert [s.name for s in splits] == [f"kfold-{i}" for i in range(5)]
    tested = [row for split in splits for row in split.test]
    assert sorted(tested) == list(range(53))
    for split in splits:
        assert_partition(split, set(range(53)))
        assert len(split.val) == round(0.2 * (53 - len(split.test)))
    assert splits == make_splits(ds, "kfold", k=5, val_fraction=0.2, seed=1)


def test_official_split_with_withheld_labels_carves_val_from_train():
    n = 40
    ds = synthetic_dataset(n, splits=["train"] * 30 + ["val"] * 4 + ["test"] * 6)
    ds = ds.map(lambda row, i: {"mos_quality": None if i >= 30 else row["mos_quality"]}, with_indices=True)

    (split,) = make_splits(ds, "official", val_fraction=0.1, seed=2)

    assert split.name == "official" and split.protocol == "official"
    assert_partition(split, set(range(30)))
    assert (len(split.train), len(split.val), len(split.test)) == (27, 3, 0)
    assert predict_indices(ds) == tuple(range(30, 40))
    assert make_splits(ds, "official", val_fraction=0.1, seed=2) == [split]


def test_official_split_with_labels_uses_them_all():
    ds = synthetic_dataset(10, splits=["train"] * 6 + ["val"] * 2 + ["test"] * 2)
    (split,) = make_splits(ds, "official")
    assert (split.train, split.val, split.test) == (tuple(range(6)), (6, 7), (8, 9))
    assert predict_indices(ds) == ()

    with pytest.raises(BadRowError, match="no official split"):
        make_splits(synthetic_dataset(10), "official")


def test_unlabelled_rows_never_enter_a_split():
    ds = synthetic_dataset(30).map(
        lambda row, i: {"mos_quality": None if i < 5 else row["mos_quality"]}, with_indices=True
    )
    for protocol in ("random", "prompt", "kfold"):
        for split in make_splits(ds, protocol, n_splits=2):
            assert_partition(split, set(range(5, 30)))


def test_bad_arguments_are_refused():
    ds = synthetic_dataset(10)
    with pytest.raises(ValueError, match="unknown split protocol 'stratified'; expected one of random, prompt"):
        make_splits(ds, "stratified")
    with pytest.raises(ValueError, match="train_fraction"):
        make_splits(ds, "random", train_fraction=1.0)
    with pytest.raises(ValueError, match="no row of the dataset carries mos_alignment"):
        make_splits(ds, "random", target="alignment")
    assert set(PROTOCOLS) == {"random", "prompt", "kfold", "official"}


def test_the_settings_that_define_a_split_name_every_argument_it_is_made_with():
    # What a resumed run must agree on and the model card reports: each protocol's make_splits arguments by their
    # data module names (folds is k), and the split index wherever the protocol makes several splits.
    ds = synthetic_dataset(40, splits=["train"] * 30 + ["val"] * 4 + ["test"] * 6)
    for protocol in PROTOCOLS:
        splits = make_splits(ds, protocol, n_splits=2, k=3)
        settings = split_settings(protocol)
        assert {"folds" if key == "k" else key for key in splits[0].arguments} <= set(settings), protocol
        assert ("split_index" in settings) == (len(splits) > 1), protocol
    shared = ("source", "root", "source_options", "target", "protocol", "val_fraction", "seed", "splits_file")
    assert split_settings("official") == split_settings(None) == shared
    own = ("split_index", "n_splits", "train_fraction", "folds")
    assert split_settings(*PROTOCOLS) == (*shared[:5], *own, *shared[5:])


def test_saved_splits_load_by_name_in_any_row_order(tmp_path):
    ds = synthetic_dataset(50)
    splits = make_splits(ds, "prompt", n_splits=2, seed=5)
    path = tmp_path / "splits" / "agiqa.json"
    save_splits(splits, path, ds)

    content = json.loads(path.read_text())
    assert content["splits"][0]["protocol"] == "prompt"
    assert content["splits"][0]["arguments"]["seed"] == 5
    assert set(content["splits"][0]["test"]) == names_of(ds, splits[0])[2]

    assert load_splits(path, ds) == splits
    shuffled = ds.select(np.random.default_rng(0).permutation(len(ds)))
    reloaded = load_splits(path, shuffled)
    assert [names_of(shuffled, s) for s in reloaded] == [names_of(ds, s) for s in splits]


def test_loading_splits_names_the_images_the_dataset_lacks(tmp_path):
    ds = synthetic_dataset(20)
    path = tmp_path / "splits.json"
    save_splits(make_splits(ds, "random", n_splits=1), path, ds)
    missing = ds["name"][make_splits(ds, "random", n_splits=1)[0].test[0]]
    smaller = ds.filter(lambda row: row["name"] != missing)

    with pytest.raises(BadRowError, match=f"split 'random-0' names 1 images the dataset lacks: {missing}"):
        load_splits(path, smaller)
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a split file"):
        load_splits(path, ds)
