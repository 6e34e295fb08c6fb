"""Readers of the AIGIQA benchmark releases, each returning a `datasets.Dataset` with one schema, and a checker.

Every reader takes a release exactly as its authors publish it (see the formats in each reader's docstring)
and returns rows with the columns of `FEATURES`. Readers fail loudly on what keeps them from reading a release at
all: a missing annotation file or column, a wrong header, tables that disagree in length, a row without an image.
Every problem of a single row is left to `check_dataset`, which is meant to run once before any training and
names them all in one message: a missing or duplicate name, a missing or non-numeric MOS (readers keep the cell's
text in the `bad_cells` column for it), an unknown split, an unreadable image, a missing prompt.

Rows are numbered from 1 in the order of the table, header not counted, in every message and report: row N is
`ds[N - 1]` and the N-th data row of the annotation file (the N-th row of the .mat files for AIGCIQA2023;
AIGIQA-20K counts on through its three tables).
"""

from __future__ import annotations

import csv
import logging
import math
import numbers
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import datasets
import numpy as np
import pandas as pd
import scipy.io

from mst_clipiqa.data.preprocess import open_image
from mst_clipiqa.errors import BadImageError, BadRowError, OptionError

logger = logging.getLogger(__name__)

_MOS_COLUMNS = ("mos_quality", "mos_alignment", "mos_authenticity")
_CELL_COLUMNS = (*_MOS_COLUMNS, "split")

FEATURES = datasets.Features(
    {
        # {"path": absolute path, "bytes": None} for image files; embedded bytes for hub data.
        "image": datasets.Image(decode=False),
        # The image's path below the release's image folder, or an id: unique per dataset (two rows share one
        # only when a table lists one image twice), used in every error message, report and split file.
        "name": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "mos_quality": datasets.Value("float64"),
        "mos_alignment": datasets.Value("float64"),
        "mos_authenticity": datasets.Value("float64"),
        # Rows of one group always land on the same side of a prompt-disjoint split; the prompt by default.
        "group": datasets.Value("string"),
        "source": datasets.Value("string"),
        # The release's official split ("train", "val", "test"), None where it has none.
        "split": datasets.Value("string"),
        # The text of cells the reader could not take (a non-numeric MOS, an unknown split), by the column they
        # were meant for; None where every cell was read. `check_dataset` reports them as written in the file.
        "bad_cells": {column: datasets.Value("string") for column in _CELL_COLUMNS},
    }
)

TARGETS = {
    "quality": "mos_quality",
    "alignment": "mos_alignment",
    "correspondence": "mos_alignment",
    "authenticity": "mos_authenticity",
}

OnBad = Literal["error", "drop"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})

_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}

# Problems listed in an error message or warning; the report file holds all of them.
_SHOWN_PROBLEMS = 10

# How every message and report numbers rows.
_ROW_NUMBERS = "rows numbered from 1, header not counted"

# How deep below a release's root its annotation files and image folders are searched for.
_SEARCH_DEPTH = 2


def target_column(target: str) -> str:
    """The MOS column of a target: a key of `TARGETS` ("quality", ...) or a MOS column name itself."""
    if target in TARGETS:
        return TARGETS[target]
    if target in TARGETS.values():
        return target
    raise ValueError(f"unknown target {target!r}; expected one of {sorted(TARGETS)} or {sorted(set(TARGETS.values()))}")


# ---------------------------------------------------------------------------------------------------------------------
# Official releases
# ---------------------------------------------------------------------------------------------------------------------


def load_agiqa1k(root: str | Path) -> datasets.Dataset:
    """Read AGIQA-1K: `AIGC_MOS_Zscore.xlsx` (header `Image,Prompt,MOS`) and its image folder.

    `AIGC_all.csv` holds raw means, not the MOS the papers use, and is never read. The official xlsx lists
    `dreamStudio_8_9_1_1.jpg` twice with different MOS; `check_dataset` rejects both copies.

    Args:
        root: the release folder. The xlsx and the image folder (often `file/`) are searched for in it and in
            its subfolders two levels down.

    Raises:
        FileNotFoundError: no xlsx, or no folder holding its images; the message says where it looked.
        BadRowError: a missing column, or rows without an image name; the message names the file and the rows.
    """
    root = _existing_dir(root)
    table = _find_file(root, "AIGC_MOS_Zscore.xlsx")
    rows = _columns(_read_frame(table), table, ("image", "prompt", "mos"))
    names = _names(rows["image"], table)
    return _assemble(
        "agiqa-1k",
        table,
        names,
        _image_files(_find_image_dir(root, names, table), names),
        prompts=_texts(rows["prompt"]),
        mos={"mos_quality": rows["mos"]},
    )


_AGIQA3K_HEADER = ("name", "prompt", "adj1", "adj2", "style", "mos_quality", "std_quality", "mos_align", "std_align")


def load_agiqa3k(root: str | Path) -> datasets.Dataset:
    """Read AGIQA-3K: `data.csv` with header `name,prompt,adj1,adj2,style,mos_quality,std_quality,mos_align,std_align`.

    `mos_align` becomes `mos_alignment`. The images lie in the root, `img/`, `images/` or another subfolder,
    depending on who unpacked them: the folder holding most of the listed names is used.

    Args:
        root: the release folder (or a hub copy holding the official data.csv).

    Raises:
        FileNotFoundError: no data.csv, or no folder holding its images.
        BadRowError: a header without the official columns, or rows without an image name.
    """
    root = _existing_dir(root)
    table = _find_file(root, "data.csv")
    rows = _columns(_read_frame(table), table, ("name", "prompt", "mos_quality", "mos_align"), expected=_AGIQA3K_HEADER)
    names = _names(rows["name"], table)
    return _assemble(
        "agiqa-3k",
        table,
        names,
        _image_files(_find_image_dir(root, names, table), names),
        prompts=_texts(rows["prompt"]),
        mos={"mos_quality": rows["mos_quality"], "mos_alignment": rows["mos_align"]},
    )


AIGCIQA2023_MODELS = ("Controlnet", "DALLE", "Glide", "Lafite", "stable-diffusion", "Unidiffuser")
_AIGCIQA2023_MOS = {"mos_quality": "mosz1.mat", "mos_authenticity": "mosz2.mat", "mos_alignment": "mosz3.mat"}
_PER_PROMPT = 4


def load_aigciqa2023(root: str | Path) -> datasets.Dataset:
    """Read AIGCIQA2023: `DATA/MOS/mosz{1,2,3}.mat`, `AIGCIQA2023_Prompts.xlsx` and the images.

    mosz1 is quality, mosz2 authenticity, mosz3 correspondence (stored as `mos_alignment`); each holds a
    variable `MOSz` with one row per image. With N rows, the first N/6 belong to Controlnet, the next N/6 to
    DALLE, then Glide, Lafite, stable-diffusion and Unidiffuser (the release has N = 2400, 400 per model).
    Within a model, rows come in fours per prompt: row i has prompt (i % (N/6)) // 4, image k = i % 4 + 1.

    The image of row i is found, in this order of preference:
      1. `pic-index.xlsx`, which lists (model, file) per row: `Image/<model>/<file>`;
      2. `Image/<model>/<PPP-k>.png`, PPP the prompt number on three digits (counted from 000 or from 001,
         whichever the Controlnet folder holds);
      3. the flat variant `allimg/<i>.png`.
    Names are the paths below the image folder (`Controlnet/000-1.png`, `allimg/0.png`): each model's folder
    holds the same file names, so a bare file name would not tell the images apart.

    Args:
        root: the release folder; files are searched for two levels down.

    Raises:
        FileNotFoundError: a .mat file, the prompts or the image folder is missing.
        BadRowError: the .mat files disagree in length, N is not a multiple of 24, the prompts do not number
            N/24, or pic-index.xlsx does not list N rows.
    """
    root = _existing_dir(root)
    mos_files = {column: _find_file(root, file) for column, file in _AIGCIQA2023_MOS.items()}
    mos = {column: _read_mat(file, "MOSz") for column, file in mos_files.items()}
    quality_file = mos_files["mos_quality"]
    n = len(mos["mos_quality"])
    if any(len(values) != n for values in mos.values()):
        lengths = ", ".join(f"{_AIGCIQA2023_MOS[c]}: {len(v)}" for c, v in mos.items())
        raise BadRowError(f"{quality_file.parent}: the MOS files differ in length ({lengths})")
    block = len(AIGCIQA2023_MODELS) * _PER_PROMPT
    if n == 0 or n % block:
        raise BadRowError(f"{quality_file}: {n} rows; expected a multiple of {block} (6 models x 4 images per prompt)")
    per_model = n // len(AIGCIQA2023_MODELS)

    prompts_file = _find_file(root, "AIGCIQA2023_Prompts.xlsx")
    prompts = _texts(_columns(_read_frame(prompts_file), prompts_file, ("prompt",))["prompt"])
    if len(prompts) != per_model // _PER_PROMPT:
        raise BadRowError(
            f"{prompts_file}: {len(prompts)} prompts, but {quality_file} holds {n} rows, which need "
            f"{per_model // _PER_PROMPT} (4 images per prompt and model)"
        )

    folder, names = _aigciqa2023_images(root, n)
    return _assemble(
        "aigciqa2023",
        root,
        names,
        _image_files(folder, names),
        prompts=[prompts[_aigciqa2023_place(i, per_model)[1]] for i in range(n)],
        mos=mos,
    )


def _aigciqa2023_place(row: int, per_model: int) -> tuple[str, int, int]:
    """(model, prompt index from 0, image number k from 1) of an AIGCIQA2023 row."""
    return AIGCIQA2023_MODELS[row // per_model], (row % per_model) // _PER_PROMPT, row % _PER_PROMPT + 1


def _aigciqa2023_images(root: Path, n: int) -> tuple[Path, list[str]]:
    """The image folder of AIGCIQA2023 and each row's path below it."""
    per_model = n // len(AIGCIQA2023_MODELS)
    index_file = _find_file(root, "pic-index.xlsx", required=False)
    if index_file is not None:
        frame = _read_frame(index_file, header=None, name_at=1)
        if len(frame) != n or frame.shape[1] < 2:
            raise BadRowError(
                f"{index_file}: expected {n} rows of (model, file), found {len(frame)} x {frame.shape[1]}"
            )
        models, files = _names(frame.iloc[:, 0].tolist(), index_file), _names(frame.iloc[:, 1].tolist(), index_file)
        return _find_dir(root, models[0]), [f"{model}/{file}" for model, file in zip(models, files)]

    folder = _find_dir(root, AIGCIQA2023_MODELS[0], required=False)
    if folder is not None:
        # Both numberings of the prompt folders' files are plausible; the first model's folder tells which.
        probe = folder / AIGCIQA2023_MODELS[0]
        first = 1 if (probe / "001-1.png").exists() and not (probe / "000-1.png").exists() else 0
        places = (_aigciqa2023_place(i, per_model) for i in range(n))
        return folder, [f"{model}/{prompt + first:03d}-{k}.png" for model, prompt, k in places]

    flat = _find_dir(root, "allimg", required=False)
    if flat is not None:
        return flat, [f"allimg/{i}.png" for i in range(n)]
    raise FileNotFoundError(
        f"{root}: no AIGCIQA2023 images: looked for pic-index.xlsx, a folder holding {AIGCIQA2023_MODELS[0]}/ "
        f"or one holding allimg/, in {root} and its subfolders {_SEARCH_DEPTH} levels down"
    )


def load_aigiqa20k(root: str | Path) -> datasets.Dataset:
    """Read AIGIQA-20K (NTIRE 2024): `info_train`, `info_val`, `info_test` (.csv or .xlsx) and the split folders.

    `info_train` holds `name,prompt,mos`; `info_val` and `info_test` hold `name,prompt` (labels withheld;
    their MOS stay None, and a `mos` column is read if a copy has one). Some copies lack the header row: a
    first row whose first cell is an image file name, or which holds a number, is data. Images of each split
    lie in `train/`, `val/`, `test/` (or wherever most of the split's names are). The `split` column is set.
    `info_val` and `info_test` are optional, so that a copy of the training data alone can be read.

    Rows are those of info_train, then info_val, then info_test, numbered on from one table to the next. Names
    are the file names the tables list, as a submission needs them; a file name listed by two tables for two
    different files becomes each file's path below the root (`train/x.png`, `test/x.png`).

    Args:
        root: the release folder.

    Raises:
        FileNotFoundError: no info_train, or no folder holding a split's images.
        BadRowError: a header without the expected columns, or rows without an image name.
    """
    root = _existing_dir(root)
    names: list[str] = []
    images: list[dict[str, Any]] = []
    prompts: list[str | None] = []
    mos: list[Any] = []
    splits: list[str] = []
    for split in ("train", "val", "test"):
        table = _find_file(root, f"info_{split}.csv", f"info_{split}.xlsx", required=split == "train")
        if table is None:
            continue
        required = ("name", "prompt", "mos") if split == "train" else ("name", "prompt")
        rows = _columns(_read_frame(table, header=None), table, required, optional=("mos",))
        part = _names(rows["name"], table)
        names += part
        images += _image_files(_find_image_dir(root, part, table), part)
        prompts += _texts(rows["prompt"])
        mos += rows.get("mos", [None] * len(part))
        splits += [split] * len(part)
    names = _names_of_files(names, images, root)
    return _assemble("aigiqa-20k", root, names, images, prompts=prompts, mos={"mos_quality": mos}, splits=splits)


def _names_of_files(names: Sequence[str], images: Sequence[dict[str, Any]], root: Path) -> list[str]:
    """`names`, except where one name stands for different files: those become each file's path below `root`.

    One name listed twice for the same file stays as it is, a duplicate for `check_dataset` to report.
    """
    files: dict[str, set[str]] = defaultdict(set)
    for name, image in zip(names, images):
        files[name].add(image["path"])
    return [
        Path(image["path"]).relative_to(root).as_posix() if len(files[name]) > 1 else name
        for name, image in zip(names, images)
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Generic tables and Hugging Face datasets
# ---------------------------------------------------------------------------------------------------------------------


def load_table(
    path: str | Path,
    *,
    image_column: str,
    mos_columns: Mapping[str, str],
    prompt_column: str | None = None,
    group_column: str | None = None,
    split_column: str | None = None,
    name_column: str | None = None,
    image_root: str | Path | None = None,
    source: str = "table",
) -> datasets.Dataset:
    """Read any annotation table: CSV, TSV, JSONL, Parquet or xlsx, chosen by the file's extension.

    Column names are matched case-insensitively. A cell that is not a number in a MOS column, or names no known
    split in the split column, is kept as written in `bad_cells` for `check_dataset` to report with the rest.

    Args:
        path: the table.
        image_column: the column of image paths, relative to `image_root` (or absolute).
        mos_columns: target → column, the targets being keys of `TARGETS`, e.g. {"quality": "MOS"}.
        prompt_column: the column of generation prompts, if any.
        group_column: the column that keeps rows together in prompt-disjoint splits; the prompt by default.
        split_column: the column of official splits (train / val / test; validation, valid and dev mean val).
        name_column: the column of unique image ids; the image path as written in the table by default.
        image_root: the folder image paths are relative to; the table's folder by default.
        source: the value of the `source` column.

    Raises:
        BadRowError: a missing column, or rows without an image path (or without a name in `name_column`).
    """
    path = Path(path)
    wanted = _mapped_columns(image_column, mos_columns, prompt_column, group_column, split_column, name_column)
    rows = _columns(_read_frame(path), path, wanted)
    paths = _names(rows[image_column.lower()], path)
    return _from_mapping(
        rows,
        path,
        _image_files(Path(image_root) if image_root is not None else path.parent, paths),
        paths,
        mos_columns=mos_columns,
        prompt_column=prompt_column,
        group_column=group_column,
        split_column=split_column,
        name_column=name_column,
        source=source,
    )


def load_hf(
    name_or_path: str | Path,
    *,
    split: str = "train",
    image_column: str = "image",
    mos_columns: Mapping[str, str],
    prompt_column: str | None = None,
    group_column: str | None = None,
    split_column: str | None = None,
    name_column: str | None = None,
    image_root: str | Path | None = None,
    source: str = "hf",
) -> datasets.Dataset:
    """Read a Hugging Face dataset: a `save_to_disk` folder, or anything `datasets.load_dataset` accepts.

    The image column is either an `Image` feature (embedded bytes stay in Arrow, never pass through Python)
    or a string column of paths. Names come from `name_column`, else from the path string, else from the
    `Image` feature's stored paths (see `_embedded_names`), so that images sharing a file name in different
    folders keep apart.

    Args:
        name_or_path: a `save_to_disk` folder, or a hub id / local data folder for `load_dataset`.
        split: the split to read from a `DatasetDict` or a hub dataset.
        image_column: the `Image` feature or path column.
        mos_columns, prompt_column, group_column, split_column, name_column, source: see `load_table`.
        image_root: the folder relative paths of a string image column refer to; the `save_to_disk` folder
            by default, else the working directory.

    Raises:
        BadRowError: a missing column, or rows without an image path (or without a name in `name_column`).
    """
    ds, base = _open_hf(name_or_path, split)
    origin = f"{name_or_path} [{split}]"
    wanted = _mapped_columns(image_column, mos_columns, prompt_column, group_column, split_column, name_column)
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise BadRowError(f"{origin}: no column(s) {', '.join(missing)} (columns: {', '.join(ds.column_names)})")
    embedded = isinstance(ds.features[image_column], datasets.Image)
    small = [c for c in wanted if not (embedded and c == image_column)]
    rows = _columns(ds.select_columns(small).to_dict(), origin, small)
    if embedded:
        images = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        # Only the path field is read, so embedded bytes stay in Arrow memory.
        names = _embedded_names(images.with_format("arrow")[:].flatten().column(f"{image_column}.path").to_pylist())
        if image_column != "image":
            images = images.rename_column(image_column, "image")
    else:
        names = _names(rows[image_column.lower()], origin)
        images = _image_files(Path(image_root) if image_root is not None else base, names)
    return _from_mapping(
        rows,
        origin,
        images,
        names,
        mos_columns=mos_columns,
        prompt_column=prompt_column,
        group_column=group_column,
        split_column=split_column,
        name_column=name_column,
        source=source,
    )


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


def _mapped_columns(image_column: str, mos_columns: Mapping[str, str], *others: str | None) -> list[str]:
    """The distinct columns a mapping reads, in a stable order; validates the MOS targets."""
    _mos_features(mos_columns)
    return list(dict.fromkeys(c for c in (image_column, *mos_columns.values(), *others) if c is not None))


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
    *,
    mos_columns: Mapping[str, str],
    prompt_column: str | None,
    group_column: str | None,
    split_column: str | None,
    name_column: str | None,
    source: str,
) -> datasets.Dataset:
    """The dataset of `load_table` and `load_hf` from their columns; `names` unless `name_column` is given."""
    key = str.lower
    if name_column is not None:
        names = _names(rows[key(name_column)], origin)
    prompts = _texts(rows[key(prompt_column)]) if prompt_column is not None else None
    return _assemble(
        source,
        origin,
        names,
        images,
        prompts=prompts,
        mos={feature: rows[key(column)] for feature, column in _mos_features(mos_columns).items()},
        groups=_texts(rows[key(group_column)]) if group_column is not None else None,
        splits=rows[key(split_column)] if split_column is not None else None,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------------

SOURCES: dict[str, Callable[..., datasets.Dataset]] = {
    "agiqa-1k": load_agiqa1k,
    "agiqa-3k": load_agiqa3k,
    "aigciqa2023": load_aigciqa2023,
    "aigiqa-20k": load_aigiqa20k,
    "table": load_table,
    "hf": load_hf,
}


def load_source(kind: str, root: str | Path, **options: Any) -> datasets.Dataset:
    """Read a data source by kind: a key of `SOURCES`, with that reader's keyword options.

    Raises:
        ValueError: an unknown kind; the message lists the known ones.
    """
    if kind not in SOURCES:
        raise OptionError(f"data.source {kind!r} is unknown; expected one of {', '.join(SOURCES)}")
    return SOURCES[kind](root, **options)


# ---------------------------------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------------------------------


def check_dataset(
    ds: datasets.Dataset,
    *,
    target: str,
    need_prompt: bool,
    check_images: bool | Callable[[datasets.Dataset], Iterable[tuple[int, str]]] = True,
    on_bad: OnBad = "error",
    report_path: str | Path | None = None,
    num_threads: int = 8,
) -> datasets.Dataset:
    """Find every problem of a dataset before training, and refuse it or drop the rows at fault.

    A row is bad when its name is missing or listed more than once (every copy is bad: with two MOS for one
    image neither can be trusted), its target MOS is missing, not a number or not finite, its split cell names
    no known split, its image is missing, unreadable, truncated or a decompression bomb, or, with `need_prompt`,
    its prompt is missing or blank. Rows of the official val/test splits without a target MOS are not bad: their
    labels are withheld and they are for prediction (see `splits.predict_indices`).

    Every message and the report number rows from 1 in the order of `ds` (row N is `ds[N - 1]`, the N-th data
    row of the annotation table), and quote a bad cell as the file holds it.

    Args:
        ds: a dataset with the columns of `FEATURES`, as a reader returns it.
        target: the target ("quality", ...) or MOS column whose values must be present.
        need_prompt: whether every row needs a prompt (the prompt-anchored head).
        check_images: True decodes every image fully (in `num_threads` threads); a function of `ds` checks them
            its own way and returns (row, reason) for every bad image, e.g. the feature cache's encoding pass, which
            decodes only the images it lacks (`mst_clipiqa.data.features.TableFeatures.prepare`); False skips them.
        on_bad: "error" raises one error naming the file, the number of bad rows and the first of them with all
            their problems; "drop" removes the bad rows and logs the same as a warning.
        report_path: where to write every problem as CSV (`name,row,reason`, one line per bad row), in both
            modes; the message says where it is.
        num_threads: threads decoding images.

    Returns:
        `ds` itself when nothing is wrong, else (with "drop") the rows without problems.

    Raises:
        BadImageError: only image problems were found (with "error").
        BadRowError: other problems were found (with "error").
    """
    column = target_column(target)
    _check_on_bad(on_bad)
    meta = ds.select_columns(["name", "prompt", column, "split", "bad_cells", "source"]).to_dict()
    names = meta["name"]
    rows_of: dict[str, list[int]] = defaultdict(list)
    for row, name in enumerate(names):
        rows_of[name].append(row)

    problems: dict[int, list[str]] = defaultdict(list)
    for row, (name, prompt, mos, split, bad) in enumerate(
        zip(names, meta["prompt"], meta[column], meta["split"], meta["bad_cells"])
    ):
        bad = bad or {}
        if not name:
            problems[row].append("no image name")
        elif len(rows_of[name]) > 1:
            copies = rows_of[name]
            problems[row].append(
                f"name listed {len(copies)} times (rows {', '.join(str(r + 1) for r in copies)}; "
                f"{column} {', '.join(str(meta[column][r]) for r in copies)})"
            )
        if bad.get(column) is not None:
            problems[row].append(f"{column} {bad[column]!r} is not a number")
        elif mos is None:
            if split not in ("val", "test"):
                problems[row].append(f"{column} is missing")
        elif not math.isfinite(mos):
            problems[row].append(f"{column} is not a finite number ({mos})")
        if bad.get("split") is not None:
            problems[row].append(f"split {bad['split']!r} is none of {', '.join(sorted(_SPLITS))}")
        if need_prompt and not (prompt and prompt.strip()):
            problems[row].append("prompt is missing")
    image_only = not problems
    if check_images:
        found = check_images(ds) if callable(check_images) else image_problems(ds, num_threads)
        for row, problem in found:
            problems[row].append(problem)
    if not problems:
        return ds

    lines = [f"{_row_label(names[row], row)}: {'; '.join(reasons)}" for row, reasons in sorted(problems.items())]
    if report_path is not None:
        _write_report(report_path, names, problems)
    # Readers record the file the rows came from; a dataset built otherwise is named by its source.
    origin = ds.info.description or meta["source"][0]
    header = f"{origin}: {len(problems)} bad rows of {len(ds)} ({_ROW_NUMBERS})"
    if report_path is not None:
        header += f"; all are listed in {report_path}"
    if on_bad == "error":
        error = BadImageError if image_only else BadRowError
        raise error(
            _summary(f'{header}. Fix them, or set on_bad to "drop" (--data.on_bad drop) to leave them out', lines)
        )
    logger.warning(_summary(f"{header}. Dropping them", lines))
    return ds.select([row for row in range(len(ds)) if row not in problems])


def _row_label(name: str | None, row: int) -> str:
    """How messages name the row at 0-based index `row` of a dataset: its name and its number from 1."""
    return f"{name} (row {row + 1})" if name else f"row {row + 1}"


def image_problems(ds: datasets.Dataset, num_threads: int = 8, batch_size: int = 256) -> list[tuple[int, str]]:
    """(row, reason) for every image of `ds` that does not decode, in row order."""
    found: list[tuple[int, str]] = []
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        for start, batch in enumerate(ds.select_columns(["image"]).iter(batch_size=batch_size)):
            for offset, problem in enumerate(pool.map(image_problem, batch["image"])):
                if problem is not None:
                    found.append((start * batch_size + offset, problem))
    return found


def image_problem(image: dict[str, Any] | None) -> str | None:
    """Why an `image` cell ({"path", "bytes"}) does not decode in full, or None when it does."""
    if image is None or (image.get("path") is None and image.get("bytes") is None):
        return "no image"
    try:
        open_image(image)
    except BadImageError as err:
        return str(err)
    return None


def _write_report(path: str | Path, names: Sequence[str], problems: Mapping[int, list[str]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["name", "row", "reason"])
        for row, reasons in sorted(problems.items()):
            writer.writerow([names[row], row + 1, "; ".join(reasons)])


def _summary(header: str, lines: Sequence[str]) -> str:
    shown = "".join(f"\n  {line}" for line in lines[:_SHOWN_PROBLEMS])
    more = f"\n  ... and {len(lines) - _SHOWN_PROBLEMS} more" if len(lines) > _SHOWN_PROBLEMS else ""
    return f"{header}:{shown}{more}"


def _check_on_bad(on_bad: str) -> None:
    if on_bad not in ("error", "drop"):
        raise ValueError(f'on_bad must be "error" or "drop", not {on_bad!r}')


# ---------------------------------------------------------------------------------------------------------------------
# Files and folders
# ---------------------------------------------------------------------------------------------------------------------


def _existing_dir(root: str | Path) -> Path:
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    return root


def _search_dirs(root: Path) -> list[Path]:
    """The root, then its subfolders level by level (sorted, hidden ones skipped), `_SEARCH_DEPTH` levels down."""
    found, level = [root], [root]
    for _ in range(_SEARCH_DEPTH):
        level = sorted(
            Path(entry.path)
            for folder in level
            for entry in os.scandir(folder)
            if entry.is_dir() and not entry.name.startswith(".")
        )
        found += level
    return found


def _find_file(root: Path, *filenames: str, required: bool = True) -> Path | None:
    """The first of `filenames` found in the root or below it; None (or an error when required) if none is."""
    for folder in _search_dirs(root):
        for filename in filenames:
            if (folder / filename).is_file():
                return folder / filename
    if required:
        raise FileNotFoundError(
            f"{root}: no {' or '.join(filenames)} in this folder or its subfolders {_SEARCH_DEPTH} levels down"
        )
    return None


def _find_dir(root: Path, child: str, *, required: bool = True) -> Path | None:
    """The first folder, the root or one below it, that holds a subfolder `child`."""
    for folder in _search_dirs(root):
        if (folder / child).is_dir():
            return folder
    if required:
        raise FileNotFoundError(
            f"{root}: no folder {child}/ in this folder or its subfolders {_SEARCH_DEPTH} levels down"
        )
    return None


def _find_image_dir(root: Path, names: Sequence[str], table: Path) -> Path:
    """The folder, the root or one below it, that holds most of `names` (the first such folder on a tie).

    Names missing from the chosen folder are left to `check_dataset` to report.
    """
    wanted = set(names)
    best, best_hits = None, 0
    searched = _search_dirs(root)
    for folder in searched:
        hits = len(wanted.intersection(os.listdir(folder)))
        if hits > best_hits:
            best, best_hits = folder, hits
        if hits == len(wanted):
            break
    if best is None:
        looked = ", ".join(str(folder) for folder in searched[:_SHOWN_PROBLEMS])
        more = f" and {len(searched) - _SHOWN_PROBLEMS} more" if len(searched) > _SHOWN_PROBLEMS else ""
        raise FileNotFoundError(f"{table}: none of its {len(wanted)} images is in {looked}{more}")
    return best


def _image_files(folder: Path, names: Iterable[str]) -> list[dict[str, Any]]:
    folder = folder.resolve()
    return [{"path": str(folder / name), "bytes": None} for name in names]


def _read_mat(path: Path, variable: str) -> list[float | None]:
    try:
        content = scipy.io.loadmat(str(path))
    except NotImplementedError as err:
        raise BadRowError(f"{path}: a MATLAB v7.3 file, which scipy cannot read; save it again with -v7") from err
    if variable not in content:
        found = ", ".join(k for k in content if not k.startswith("__"))
        raise BadRowError(f"{path}: no variable {variable} (found: {found})")
    values = np.asarray(content[variable])
    if values.ndim > 2 or (values.ndim == 2 and min(values.shape) != 1):
        raise BadRowError(f"{path}: {variable} has shape {values.shape}; expected one column")
    try:
        return [None if math.isnan(v) else v for v in values.astype(np.float64).ravel().tolist()]
    except (TypeError, ValueError) as err:
        raise BadRowError(f"{path}: {variable} is not numeric ({values.dtype})") from err


# ---------------------------------------------------------------------------------------------------------------------
# Tables and cells
# ---------------------------------------------------------------------------------------------------------------------


def _read_frame(path: Path, *, header: bool | None = True, name_at: int = 0) -> pd.DataFrame:
    """A table's cells as Python values, by extension; empty cells stay empty strings.

    Args:
        header: True reads the first row as the header; None (CSV and xlsx only) reads it as the header
            unless `_is_data_row` says it is data, in which case the columns are numbered from 0.
        name_at: the column of image file names, for `_is_data_row`.
    """
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".parquet"):
        if not header:
            raise ValueError(f"{path}: {suffix} files always name their columns")
        frame = pd.read_json(path, lines=True, dtype=False) if suffix == ".jsonl" else pd.read_parquet(path)
        return frame.astype(object).where(frame.notna(), None)
    if header:
        return _read_cells(path, 0)
    frame = _read_cells(path, None)
    if len(frame) and not _is_data_row(frame.iloc[0].tolist(), name_at):
        frame = frame.iloc[1:].set_axis([str(c) for c in frame.iloc[0]], axis=1).reset_index(drop=True)
    return frame


def _read_cells(path: Path, header: int | None) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", header=header, dtype=str, keep_default_na=False)
    if suffix in (".xlsx", ".xls"):
        return pd.read_excel(path, header=header, dtype=object, na_filter=False)
    raise ValueError(f"{path}: unknown table format {suffix!r}; expected .csv, .tsv, .jsonl, .parquet or .xlsx")


def _is_data_row(cells: Sequence[Any], name_at: int = 0) -> bool:
    """Whether a table's first row is data rather than a header: it names an image file or holds a number."""
    name = _text(cells[name_at]) if len(cells) > name_at else None
    if name is not None and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
        return True
    return any(_is_number(cell) for cell in cells)


def _is_number(value: Any) -> bool:
    try:
        return _to_float(value) is not None
    except ValueError:
        return False


def _columns(
    table: pd.DataFrame | Mapping[str, list],
    origin: str | Path,
    required: Sequence[str],
    *,
    optional: Sequence[str] = (),
    expected: Sequence[str] | None = None,
) -> dict[str, list]:
    """The named columns of a table as lists, keyed by lower-case name.

    A table read without a header (numbered columns) gets `required`, then `optional`, names by position.

    Raises:
        BadRowError: a required column is missing; the message shows the header found and the one expected.
    """
    columns = {str(c).strip().lower(): c for c in table.keys()}
    if all(isinstance(c, numbers.Integral) for c in table.keys()):
        columns = {name: c for name, c in zip((*required, *optional), table.keys())}
    missing = [c for c in required if c.lower() not in columns]
    if missing:
        found = ", ".join(str(c) for c in table.keys())
        want = ", ".join(expected or (*required, *optional))
        raise BadRowError(f"{origin}: no column(s) {', '.join(missing)}; header found: {found}; expected: {want}")
    return {
        name.lower(): list(table[columns[name.lower()]]) for name in (*required, *optional) if name.lower() in columns
    }


def _text(value: Any) -> str | None:
    """A cell as stripped text; None when empty. Whole floats read from spreadsheets lose their `.0`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _texts(values: Iterable[Any]) -> list[str | None]:
    return [_text(value) for value in values]


def _names(values: Iterable[Any], origin: str | Path) -> list[str]:
    """Image names (or paths) of a table.

    Raises:
        BadRowError: rows without one: nothing of such a row can be found or checked, so the table is refused
            at once; the message names every such row.
    """
    names = _texts(values)
    empty = [f"row {row}" for row, name in enumerate(names, 1) if name is None]
    if empty:
        header = f"{origin}: {len(empty)} rows without an image name ({_ROW_NUMBERS}); fill them in or remove them"
        raise BadRowError(_summary(header, empty))
    return names


def _to_float(value: Any) -> float | None:
    """A MOS cell as a float; None when empty or NaN.

    Raises:
        ValueError: the cell is not a number.
    """
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, numbers.Real):
        number = float(value)
    else:
        text = _text(value)
        if text is None:
            return None
        number = float(text)
    return None if math.isnan(number) else number


def _floats(values: Sequence[Any]) -> tuple[list[float | None], list[str | None]]:
    """MOS cells as floats, None where empty or not a number, and the text of each cell that is not a number."""
    parsed: list[float | None] = []
    bad: list[str | None] = []
    for value in values:
        try:
            parsed.append(_to_float(value))
            bad.append(None)
        except ValueError:
            parsed.append(None)
            bad.append(str(value))
    return parsed, bad


def _splits(values: Sequence[Any]) -> tuple[list[str | None], list[str | None]]:
    """Split cells as "train", "val" or "test" (None where empty or unknown), and the text of each unknown one."""
    texts = _texts(values)
    known = [_SPLITS.get(text.lower()) if text is not None else None for text in texts]
    return known, [text if split is None else None for text, split in zip(texts, known)]


def _assemble(
    source: str,
    origin: str | Path,
    names: list[str],
    images: list[dict[str, Any]] | datasets.Dataset,
    *,
    prompts: list[str | None] | None = None,
    mos: Mapping[str, Sequence[Any]] | None = None,
    groups: list[str | None] | None = None,
    splits: Sequence[Any] | None = None,
) -> datasets.Dataset:
    """The dataset in the common schema; `images` is a list of image dicts or a one-column `image` dataset.

    Args:
        origin: the file (or folder) the rows were read from, named by `check_dataset`'s messages.
        mos: MOS column → the cells as read; cells that are not numbers go to `bad_cells`.
        splits: the split cells as read; unknown ones go to `bad_cells`.
    """
    n = len(names)
    cells = {column: _floats(values) for column, values in (mos or {}).items()}
    if splits is not None:
        cells["split"] = _splits(splits)
    columns: dict[str, list] = {
        "name": names,
        "prompt": prompts if prompts is not None else [None] * n,
        **{column: cells[column][0] if column in cells else [None] * n for column in _MOS_COLUMNS},
        "group": groups if groups is not None else prompts if prompts is not None else [None] * n,
        "source": [source] * n,
        "split": cells["split"][0] if splits is not None else [None] * n,
        "bad_cells": [
            {column: bad[row] for column, (_, bad) in cells.items() if bad[row] is not None} or None for row in range(n)
        ],
    }
    if isinstance(images, datasets.Dataset):
        rest = datasets.Dataset.from_dict(columns, features=datasets.Features({k: FEATURES[k] for k in columns}))
        ds = datasets.concatenate_datasets([images, rest], axis=1).select_columns(list(FEATURES))
    else:
        ds = datasets.Dataset.from_dict({"image": images, **columns}, features=FEATURES)
    ds.info.description = str(origin)  # the dataset's own copy; `select` and `map` keep it
    return ds
