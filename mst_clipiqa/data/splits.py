"""Train/val/test splits by the papers' protocols, from the rows that carry the target MOS, saved by image name.

Rows are ordered by name before any shuffling, and saved splits hold names, so a split depends on the set of images
and the seed, not on the order a table lists them in.
"""

from __future__ import annotations

import functools
import gzip
import json
import lzma
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from mst_clipiqa.data.schema import FEATURES, SHOWN_PROBLEMS, target_column
from mst_clipiqa.errors import BadRowError

PROTOCOL_SETTINGS = {
    "random": ("split_index", "n_splits", "train_fraction"),
    "prompt": ("split_index", "n_splits", "train_fraction"),
    "kfold": ("split_index", "folds"),
    "official": (),
}
"""Per protocol, the `IQADataModule` settings that define its split beyond those every protocol shares (``folds`` is
`make_splits`' ``k``)."""
PROTOCOLS = tuple(PROTOCOL_SETTINGS)


def split_settings(*protocols: str | None) -> tuple[str, ...]:
    """The data-module settings that define which rows train, validate and test under any of `protocols` (an unknown
    one, or None, adds none of its own)."""
    own = dict.fromkeys(key for protocol in protocols for key in PROTOCOL_SETTINGS.get(protocol, ()))
    return ("source", "root", "source_options", "target", "protocol", *own, "val_fraction", "seed", "splits_file")


PARTS = ("train", "val", "test")
_TRAIN, _VAL, _TEST = range(3)

_FORMAT = "mst-clipiqa-splits"
_VERSION = 1
_SHIPPED_VERSION = 2
_PART_LETTERS = {"train": "t", "val": "v", "test": "s"}
"""A row's part in a shipped split; "-" for a row the split leaves out."""


@dataclass(frozen=True)
class Split:
    """One train/val/test partition of a dataset's rows."""

    name: str
    """The split's name, e.g. "random-3" (the fourth random split)."""
    train: tuple[int, ...]
    """Row indices for training, sorted."""
    val: tuple[int, ...]
    """Row indices for validation (model selection), sorted; may be empty."""
    test: tuple[int, ...]
    """Row indices for the final evaluation, sorted; may be empty (the official split of AIGIQA-20K)."""
    protocol: str = "custom"
    """The protocol that made the split (one of `PROTOCOLS`)."""
    arguments: dict[str, Any] = field(default_factory=dict, hash=False)
    """The `make_splits` arguments the protocol depends on."""


def make_splits(
    ds: datasets.Dataset,
    protocol: str,
    *,
    target: str = "quality",
    n_splits: int = 10,
    train_fraction: float = 0.8,
    val_fraction: float = 0.1,
    k: int = 5,
    seed: int = 0,
) -> list[Split]:
    """Split a dataset's labelled rows by one of the papers' protocols into splits named "<protocol>-<i>" ("official"
    for the one official split), seeded with numpy's default generator:

    "random": `n_splits` image-level splits; split i shuffles with seed `seed + i`, puts `train_fraction`
        of the rows in train+val and the rest in test, then moves `val_fraction` of train+val to val
        (the test part stays untouched by model selection).
    "prompt": as "random", but whole groups (the `group` column: the prompt unless a loader mapped
        another column) go to one side, val included, so no prompt is shared between train, val and test.
    "kfold": `k` image-level folds; split i tests on fold i, and `val_fraction` of the other folds is
        held out for validation.
    "official": the `split` column: labelled train rows train, labelled val rows validate, labelled test
        rows test. When the official val rows carry no labels, `val_fraction` of train validates.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown split protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), not {val_fraction}")
    if protocol in ("random", "prompt") and not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), not {train_fraction}")
    if protocol == "kfold" and k < 2:
        raise ValueError(f"k must be at least 2, not {k}")
    if protocol in ("random", "prompt") and n_splits < 1:
        raise ValueError(f"n_splits must be at least 1, not {n_splits}")

    column = target_column(target)
    meta = ds.select_columns(["name", column, "group", "split"]).to_dict()
    labelled = [row for row, mos in enumerate(meta[column]) if _is_label(mos)]
    if not labelled:
        raise ValueError(f"no row of the dataset carries {column}")
    rows = np.array(sorted(labelled, key=lambda row: (meta["name"][row], row)), dtype=np.int64)

    if protocol == "random":
        parts = _shuffled(rows, np.arange(len(rows)), "random", n_splits, train_fraction, val_fraction, seed)
    elif protocol == "prompt":
        parts = _shuffled(rows, _group_ids(rows, meta), "prompt", n_splits, train_fraction, val_fraction, seed)
    elif protocol == "kfold":
        folds = np.array_split(np.random.default_rng(seed).permutation(rows), k)
        parts = [
            (f"kfold-{i}", *_hold_out(np.concatenate(folds[:i] + folds[i + 1 :]), val_fraction, seed + i), folds[i])
            for i in range(k)
        ]
    else:
        parts = [_official(rows, meta, val_fraction, seed)]

    given = {
        "target": target,
        "n_splits": n_splits,
        "train_fraction": train_fraction,
        "val_fraction": val_fraction,
        "k": k,
        "seed": seed,
    }
    # The arguments the protocol depends on, saved with its splits.
    own = ("k" if key == "folds" else key for key in PROTOCOL_SETTINGS[protocol] if key != "split_index")
    arguments = {key: given[key] for key in ("target", *own, "val_fraction", "seed")}
    return [
        Split(name, *(tuple(sorted(part.tolist())) for part in (train, val, test)), protocol, dict(arguments))
        for name, train, val, test in parts
    ]


_Parts = tuple[str, np.ndarray, np.ndarray, np.ndarray]


def _shuffled(
    rows: np.ndarray,
    group_of: np.ndarray,
    protocol: str,
    n_splits: int,
    train_fraction: float,
    val_fraction: float,
    seed: int,
) -> list[_Parts]:
    """Splits that deal whole groups to train, val and test; `group_of[j]` is the group id of `rows[j]`.

    With one group per row this is the image-level random protocol.
    """
    n_groups = int(group_of.max()) + 1
    parts = []
    for i in range(n_splits):
        order = np.random.default_rng(seed + i).permutation(n_groups)
        n_fit = _share(n_groups, train_fraction)
        side = np.full(n_groups, _TEST)
        side[order[:n_fit]] = _TRAIN
        side[order[: _share(n_fit, val_fraction)]] = _VAL
        where = side[group_of]
        parts.append((f"{protocol}-{i}", rows[where == _TRAIN], rows[where == _VAL], rows[where == _TEST]))
    return parts


def _group_ids(rows: np.ndarray, meta: dict[str, list]) -> np.ndarray:
    """The group of each row as an index into the sorted distinct groups."""
    groups = meta["group"]
    missing = [meta["name"][row] for row in rows if not groups[row]]
    if missing:
        raise BadRowError(
            f"{len(missing)} rows have no group (e.g. {', '.join(missing[:SHOWN_PROBLEMS])}); prompt-disjoint splits "
            "need the group column (the prompt by default)"
        )
    distinct = sorted({groups[row] for row in rows})
    if len(distinct) < 2:
        raise ValueError(f"prompt-disjoint splits need at least 2 groups; the dataset has {len(distinct)}")
    position = {group: i for i, group in enumerate(distinct)}
    return np.array([position[groups[row]] for row in rows], dtype=np.int64)


def _official(rows: np.ndarray, meta: dict[str, list], val_fraction: float, seed: int) -> _Parts:
    official = meta["split"]
    unassigned = [meta["name"][row] for row in rows if official[row] is None]
    if unassigned:
        raise BadRowError(
            f"{len(unassigned)} labelled rows have no official split (e.g. {', '.join(unassigned[:SHOWN_PROBLEMS])}); "
            'the "official" protocol needs a split for every row'
        )
    train, val, test = (np.array([row for row in rows if official[row] == part], dtype=np.int64) for part in PARTS)
    if not len(val):
        train, val = _hold_out(train, val_fraction, seed)
    return "official", train, val, test


def _hold_out(rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): a random `fraction` of `rows` held out for validation."""
    order = np.random.default_rng(seed).permutation(rows)
    n_val = _share(len(order), fraction)
    return order[n_val:], order[:n_val]


def predict_indices(ds: datasets.Dataset, target: str = "quality") -> tuple[int, ...]:
    """Rows without the target MOS (withheld labels of an official val/test split): the ones to predict."""
    column = target_column(target)
    return tuple(row for row, mos in enumerate(ds[column][:]) if not _is_label(mos))


def save_splits(splits: Sequence[Split], path: str | Path, ds: datasets.Dataset) -> None:
    """Write splits as JSON (compressed when `path` ends in .gz or .xz), each with its protocol, arguments and the
    image names of its rows."""
    names = ds["name"][:]  # a list: indexing a column of a Dataset reads Arrow once per call
    content = {
        "format": _FORMAT,
        "version": _VERSION,
        "splits": [
            {
                "name": s.name,
                "protocol": s.protocol,
                "arguments": s.arguments,
                **{part: [names[row] for row in getattr(s, part)] for part in PARTS},
            }
            for s in splits
        ],
    }
    _write_text(Path(path), json.dumps(content, indent=1) + "\n")


def save_shipped_splits(splits: Sequence[Split], path: str | Path, ds: datasets.Dataset) -> None:
    """Write the splits of one protocol and set of arguments small enough to ship, with what it takes to make them
    again (`remake_shipped_splits`).

    The file (JSON, compressed when `path` ends in .xz or .gz) lists every name of `ds` once, sorted, and per split
    one letter per name: t train, v val, s test, - none. Prompt-disjoint splits add each name's group as a number
    (the groups numbered in their sorted order), which is all the protocol reads of them.
    """
    _write_text(Path(path), _shipped_text(splits, ds))


def _shipped_text(splits: Sequence[Split], ds: datasets.Dataset) -> str:
    if not splits or any((s.protocol, s.arguments) != (splits[0].protocol, splits[0].arguments) for s in splits):
        raise ValueError("a shipped split file holds the splits of one protocol with one set of arguments")
    names = ds["name"][:]
    order = sorted(range(len(names)), key=lambda row: names[row])
    content: dict[str, Any] = {
        "format": _FORMAT,
        "version": _SHIPPED_VERSION,
        "protocol": splits[0].protocol,
        "arguments": splits[0].arguments,
        "names": [names[row] for row in order],
    }
    if splits[0].protocol == "prompt":
        groups = ds["group"][:]
        if any(group is None for group in groups):
            raise ValueError("prompt-disjoint splits to ship need a group for every row")
        number = {group: i for i, group in enumerate(sorted(set(groups)))}
        content["groups"] = [number[groups[row]] for row in order]
    content["splits"] = {}
    for split in splits:
        letters = ["-"] * len(names)
        for part, letter in _PART_LETTERS.items():
            for row in getattr(split, part):
                letters[row] = letter
        content["splits"][split.name] = "".join(letters[row] for row in order)
    return json.dumps(content, separators=(",", ":")) + "\n"


def remake_shipped_splits(path: str | Path) -> str:
    """The text `save_shipped_splits` writes for the splits that `make_splits` makes, today, from the names (and
    groups) a shipped file holds, by the protocol and arguments it names: the file's own text (`read_shipped_text`)
    when the file is what it claims to be. Names no split uses are taken as unlabelled."""
    content = _read_json(Path(path))
    names = content["names"]
    used = [any(letters[i] != "-" for letters in content["splits"].values()) for i in range(len(names))]
    groups = [f"{group:09d}" for group in content["groups"]] if "groups" in content else [None] * len(names)
    arguments = dict(content["arguments"])
    target = arguments.pop("target")
    column = target_column(target)
    rows = {"name": names, column: [1.0 if u else None for u in used], "group": groups, "split": [None] * len(names)}
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features({key: FEATURES[key] for key in rows}))
    return _shipped_text(make_splits(ds, content["protocol"], target=target, **arguments), ds)


_COMPRESSED = {
    # mtime 0: the same splits give the same bytes.
    ".gz": (functools.partial(gzip.compress, compresslevel=9, mtime=0), gzip.decompress),
    ".xz": (functools.partial(lzma.compress, preset=9), lzma.decompress),
}
"""How a split file ending in .gz or .xz is compressed and decompressed; others are plain JSON."""


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    path.write_bytes(_COMPRESSED[path.suffix][0](data) if path.suffix in _COMPRESSED else data)


def read_shipped_text(path: str | Path) -> str:
    """The JSON text of a split file, compressed (.gz, .xz) or not."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix in _COMPRESSED:
        try:
            data = _COMPRESSED[path.suffix][1](data)
        except (OSError, EOFError, lzma.LZMAError) as err:
            raise ValueError(f"{path}: not a {path.suffix} file ({err})") from err
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a split file ({err})") from err


def _read_json(path: Path) -> Any:
    try:
        return json.loads(read_shipped_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a split file ({err})") from err


def _shipped_entries(content: dict[str, Any]) -> list[dict[str, Any]]:
    """The splits of a shipped file as `save_splits` entries (names per part)."""
    names = content["names"]
    entries = []
    for name, letters in content["splits"].items():
        parts = {part: [n for n, got in zip(names, letters) if got == letter] for part, letter in _PART_LETTERS.items()}
        entries.append({"name": name, "protocol": content["protocol"], "arguments": content["arguments"], **parts})
    return entries


def load_splits(path: str | Path, ds: datasets.Dataset) -> list[Split]:
    """Read splits written by `save_splits` or `save_shipped_splits`, mapping their image names to the rows of `ds`,
    which must hold each name once and every name a split lists."""
    path = Path(path)
    content = _read_json(path)
    if not isinstance(content, dict) or content.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a split file (no format {_FORMAT!r})")
    if content.get("version") == _SHIPPED_VERSION:
        content = {"splits": _shipped_entries(content)}
    elif content.get("version") != _VERSION:
        known = f"{_VERSION} and {_SHIPPED_VERSION}"
        raise ValueError(f"{path}: split file version {content.get('version')}; this reader knows {known}")
    row_of: dict[str, int] = {}
    for row, name in enumerate(ds["name"][:]):
        if name in row_of:
            raise ValueError(f"{path}: the dataset lists {name!r} twice (rows {row_of[name]} and {row})")
        row_of[name] = row
    splits = []
    for entry in content["splits"]:
        missing = [name for part in PARTS for name in entry[part] if name not in row_of]
        if missing:
            raise BadRowError(
                f"{path}: split {entry['name']!r} names {len(missing)} images the dataset lacks: "
                f"{', '.join(missing[:SHOWN_PROBLEMS])}{' ...' if len(missing) > SHOWN_PROBLEMS else ''}"
            )
        parts = (tuple(sorted(row_of[name] for name in entry[part])) for part in PARTS)
        splits.append(Split(entry["name"], *parts, protocol=entry["protocol"], arguments=entry["arguments"]))
    return splits


def _is_label(mos: float | None) -> bool:
    return mos is not None and math.isfinite(mos)


def _share(n: int, fraction: float) -> int:
    return round(n * fraction)
