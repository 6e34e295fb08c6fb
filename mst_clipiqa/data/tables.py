"""Readers of any annotation table and of Hugging Face datasets, by a column mapping (`Columns`), and `load_source`,
which reads any data source by its `data.source` name."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import datasets

from mst_clipiqa.data.cells import assemble, image_files, image_names, read_frame, table_columns
from mst_clipiqa.data.releases import RELEASES
from mst_clipiqa.data.schema import TARGETS
from mst_clipiqa.errors import BadRowError, OptionError


@dataclass
class Columns:
    """Which columns of a table or Hugging Face dataset hold each image, its MOS and the rest: the source options of
    the `table` and `hf` sources. Column names are matched case-insensitively in tables."""

    mos_columns: dict[str, str]
    """Target → column, e.g. {quality: MOS, alignment: align_score}; targets: quality, alignment (= correspondence),
    authenticity."""
    image_column: str = "image"
    """The column of image paths, relative to image_root or absolute; for hf also an Image feature."""
    prompt_column: str | None = None
    """The column of generation prompts: needed by the prompt head, shown in predictions."""
    group_column: str | None = None
    """The column that keeps rows together in prompt-disjoint splits; the prompt by default."""
    split_column: str | None = None
    """The column of official splits (train, val, test; validation, valid and dev mean val)."""
    name_column: str | None = None
    """The column of unique image ids; by default the image path as written (for an hf Image feature, its stored path
    below the folder all stored paths share)."""
    image_root: str | None = None
    """The folder relative image paths refer to; by default the table's folder (hf: the save_to_disk folder, else
    the working directory)."""
    split: str | None = None
    """hf only: the split of a DatasetDict or hub dataset to read; train by default."""


def load_table(path: str | Path, columns: Columns, *, source: str = "table") -> datasets.Dataset:
    """Read any annotation table: CSV, TSV, JSONL, Parquet or xlsx, chosen by the file's extension.

    Column names are matched case-insensitively. A cell that is not a number in a MOS column, or names no known
    split in the split column, is kept as written in `bad_cells` for `check_dataset` to report with the rest.
    """
    if columns.split is not None:
        raise OptionError(
            f"data.source_options.split {columns.split!r} chooses a split of a Hugging Face dataset (data.source hf); "
            "a table's official splits come from its split_column"
        )
    path = Path(path)
    rows = table_columns(read_frame(path), path, _mapped_columns(columns))
    paths = image_names(rows[columns.image_column.lower()], path)
    folder = Path(columns.image_root) if columns.image_root is not None else path.parent
    return _from_mapping(rows, path, image_files(folder, paths), paths, columns, source)


def load_hf(name_or_path: str | Path, columns: Columns, *, source: str = "hf") -> datasets.Dataset:
    """Read a Hugging Face dataset: a `save_to_disk` folder, or anything `datasets.load_dataset` accepts.

    The image column is either an `Image` feature (embedded bytes stay in Arrow, never pass through Python)
    or a string column of paths. Names come from `name_column`, else from the path string, else from the
    `Image` feature's stored paths (see `_embedded_names`), so that images sharing a file name in different
    folders keep apart.
    """
    split = columns.split if columns.split is not None else "train"
    ds, base = _open_hf(name_or_path, split)
    origin = f"{name_or_path} [{split}]"
    image_column = columns.image_column
    wanted = _mapped_columns(columns)
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise BadRowError(f"{origin}: no column(s) {', '.join(missing)} (columns: {', '.join(ds.column_names)})")
    embedded = isinstance(ds.features[image_column], datasets.Image)
    small = [c for c in wanted if not (embedded and c == image_column)]
    rows = table_columns(ds.select_columns(small).to_dict(), origin, small)
    if embedded:
        images = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        # Only the path field is read, so embedded bytes stay in Arrow memory.
        names = _embedded_names(images.with_format("arrow")[:].flatten().column(f"{image_column}.path").to_pylist())
        if image_column != "image":
            images = images.rename_column(image_column, "image")
    else:
        names = image_names(rows[image_column.lower()], origin)
        images = image_files(Path(columns.image_root) if columns.image_root is not None else base, names)
    return _from_mapping(rows, origin, images, names, columns, source)


def _open_hf(name_or_path: str | Path, split: str) -> tuple[datasets.Dataset, Path]:
    """The dataset, and the folder relative image paths refer to by default."""
    local = Path(name_or_path)
    if not ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
        return datasets.load_dataset(str(name_or_path), split=split), Path.cwd()
    ds = datasets.load_from_disk(str(local))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{local}: no split {split!r}; it holds {sorted(ds)}")
        ds = ds[split]
    return ds, local


def _embedded_names(paths: Sequence[str | None]) -> list[str]:
    """Names of embedded images: each stored path relative to the folder all stored paths share.

    A row without a stored path is named by its row number (from 1). Rows sharing a stored path get their row
    number in front, `12/000-1.png`: saving a dataset (`save_to_disk`, `push_to_hub`) keeps only each image's
    file name, so `DALLE/000-1.png` and `Glide/000-1.png` both come back as `000-1.png`. Should such a name be
    another row's path, every row gets its number in front.
    """
    parts = [PurePosixPath(path).parts if path else None for path in paths]
    common = len(os.path.commonprefix([p[:-1] for p in parts if p is not None]))
    relative = [PurePosixPath(*p[common:]).as_posix() if p is not None else None for p in parts]
    counts = Counter(relative)

    def numbered(row: int, path: str | None) -> str:
        return f"{row}/{path}" if path is not None else str(row)

    rows = range(1, len(relative) + 1)
    names = [
        path if path is not None and counts[path] == 1 else numbered(row, path) for row, path in zip(rows, relative)
    ]
    if len(set(names)) < len(names):
        names = [numbered(row, path) for row, path in zip(rows, relative)]
    return names


def _mapped_columns(columns: Columns) -> list[str]:
    """The distinct columns a mapping reads, in a stable order; validates the MOS targets."""
    _mos_features(columns.mos_columns)
    others = (columns.prompt_column, columns.group_column, columns.split_column, columns.name_column)
    wanted = (columns.image_column, *columns.mos_columns.values(), *others)
    return list(dict.fromkeys(c for c in wanted if c is not None))


def _mos_features(mos_columns: Mapping[str, str]) -> dict[str, str]:
    """Target → column mapping as MOS feature → column; rejects unknown targets and two targets on one feature."""
    features: dict[str, str] = {}
    for target, column in mos_columns.items():
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r} in mos_columns; expected one of {sorted(TARGETS)}")
        feature = TARGETS[target]
        if feature in features:
            raise ValueError(f"mos_columns maps two targets to {feature}: {features[feature]!r} and {column!r}")
        features[feature] = column
    return features


def _from_mapping(
    rows: Mapping[str, list],
    origin: str | Path,
    images: list[dict[str, Any]] | datasets.Dataset,
    names: list[str],
    columns: Columns,
    source: str,
) -> datasets.Dataset:
    """The dataset of `load_table` and `load_hf` from their columns; `names` unless `name_column` is given."""

    def column(name: str | None) -> list | None:
        return rows[name.lower()] if name is not None else None

    if columns.name_column is not None:
        names = image_names(column(columns.name_column), origin)
    return assemble(
        source,
        origin,
        names,
        images,
        prompts=column(columns.prompt_column),
        mos={feature: column(name) for feature, name in _mos_features(columns.mos_columns).items()},
        groups=column(columns.group_column),
        splits=column(columns.split_column),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Any source by name
# ---------------------------------------------------------------------------------------------------------------------

SOURCES: dict[str, Callable[..., datasets.Dataset]] = {**RELEASES, "table": load_table, "hf": load_hf}
"""Every reader by `data.source` name: the official releases, which take no options, then `table` and `hf`, which
take a `Columns`."""


def load_source(kind: str, root: str | Path, options: Columns | None = None) -> datasets.Dataset:
    """Read a data source by kind: a key of `SOURCES`, with the column mapping of `table` and `hf` (and none for an
    official release, which reads its own files)."""
    if kind not in SOURCES:
        raise OptionError(f"data.source {kind!r} is unknown; expected one of {', '.join(SOURCES)}")
    if kind in RELEASES:
        if options is not None:
            raise OptionError(
                f"data.source {kind} reads its release's own files and takes no data.source_options (they map the "
                "columns of a table or hf source); remove them"
            )
        return RELEASES[kind](root)
    if options is None:
        raise OptionError(
            f"data.source {kind} needs data.source_options: at least mos_columns ({{target: column}}, e.g. "
            "{quality: MOS}), and image_column unless it is 'image'"
        )
    return SOURCES[kind](root, options)
