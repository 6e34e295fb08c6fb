"""From the cells of annotation files (tables, .mat files) to the unified table.

Cells a reader cannot take (a MOS that is not a number, a split cell naming no split) are kept as written in the
`bad_cells` column, for `check_dataset` to report with every other problem of a row.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import scipy.io

from mst_clipiqa.data.schema import FEATURES, IMAGE_EXTENSIONS, MOS_COLUMNS, ROW_NUMBERS, SPLITS, row_label, summary
from mst_clipiqa.errors import BadRowError


def read_frame(path: Path, *, header: bool | None = True, name_at: int = 0) -> pd.DataFrame:
    """A table's cells, by extension: CSV and TSV as text, xlsx as stored; empty cells stay empty strings.

    `header` True reads the first row as the header; False (CSV and xlsx only) reads every row as data, the columns
    numbered from 0; None (CSV and xlsx only) reads the first row as the header unless it holds a number or names an
    image file in column `name_at`.
    """
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".parquet"):
        if not header:
            raise ValueError(f"{path}: {suffix} files always name their columns")
        frame = pd.read_json(path, lines=True, dtype=False) if suffix == ".jsonl" else pd.read_parquet(path)
        return frame.astype(object).where(frame.notna(), None)
    row = 0 if header else None
    if suffix in (".csv", ".tsv"):
        frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", header=row, dtype=str, keep_default_na=False)
    elif suffix in (".xlsx", ".xls"):
        frame = pd.read_excel(path, header=row, dtype=object, na_filter=False)
    else:
        raise ValueError(f"{path}: unknown table format {suffix!r}; expected .csv, .tsv, .jsonl, .parquet or .xlsx")
    if header is None and len(frame) and not _is_data_row(frame.iloc[0].tolist(), name_at):
        frame = frame.iloc[1:].set_axis([str(c) for c in frame.iloc[0]], axis=1).reset_index(drop=True)
    return frame


def _is_data_row(cells: Sequence[Any], name_at: int = 0) -> bool:
    """Whether a table's first row is data rather than a header: it names an image file or holds a number."""
    name = as_text(cells[name_at]) if len(cells) > name_at else None
    if name is not None and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
        return True
    return any(_is_number(cell) for cell in cells)


def _is_number(value: Any) -> bool:
    try:
        return _to_float(value) is not None
    except ValueError:
        return False


def table_columns(
    table: pd.DataFrame | Mapping[str, list],
    origin: str | Path,
    required: Sequence[str],
    *,
    optional: Sequence[str] = (),
    expected: Sequence[str] | None = None,
) -> dict[str, list]:
    """The named columns of a table as lists, keyed by lower-case name; a BadRowError showing the header found and
    the one expected (`expected`, else `required` and `optional`) when a required column is missing.

    A table read without a header (numbered columns) gets `required`, then `optional`, names by position.
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


def as_text(value: Any) -> str | None:
    """A cell as stripped text; None when empty. Whole floats read from spreadsheets lose their `.0`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def as_texts(values: Iterable[Any]) -> list[str | None]:
    """`as_text` of every cell."""
    return [as_text(value) for value in values]


def image_names(values: Iterable[Any], origin: str | Path) -> list[str]:
    """Image names (or paths) of a table. Rows without one are refused at once (BadRowError naming them): nothing of
    such a row can be found or checked."""
    names = as_texts(values)
    empty = [row_label(None, row) for row, name in enumerate(names) if name is None]
    if empty:
        header = f"{origin}: {len(empty)} rows without an image name ({ROW_NUMBERS}); fill them in or remove them"
        raise BadRowError(summary(header, empty))
    return names


def _to_float(value: Any) -> float | None:
    """A MOS cell as a float; None when empty or NaN, ValueError when not a number."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, numbers.Real):
        number = float(value)
    else:
        text = as_text(value)
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
    texts = as_texts(values)
    known = [SPLITS.get(text.lower()) if text is not None else None for text in texts]
    return known, [text if split is None else None for text, split in zip(texts, known)]


def read_mat(path: Path, variable: str) -> list[float | None]:
    """The one-column numeric `variable` of a MATLAB file (v7 or older) as floats, None where NaN."""
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


def image_files(folder: Path, names: Iterable[str]) -> list[dict[str, Any]]:
    """The `image` cells of files named by paths below `folder` (absolute paths stay as they are)."""
    folder = folder.resolve()
    return [{"path": str(folder / name), "bytes": None} for name in names]


def assemble(
    source: str,
    origin: str | Path,
    names: list[str],
    images: list[dict[str, Any]] | datasets.Dataset,
    *,
    prompts: Sequence[Any] | None = None,
    mos: Mapping[str, Sequence[Any]] | None = None,
    groups: Sequence[Any] | None = None,
    splits: Sequence[Any] | None = None,
) -> datasets.Dataset:
    """The dataset in the common schema; `images` is a list of image dicts or a one-column `image` dataset.

    `origin` is the file (or folder) the rows were read from, for `check_dataset`'s messages. Every column is given
    as its cells are read: `mos` maps MOS columns to theirs; the MOS and `splits` cells a reader cannot take go to
    `bad_cells`.
    """
    n = len(names)
    none = [None] * n
    cells = {column: _floats(values) for column, values in (mos or {}).items()}
    if splits is not None:
        cells["split"] = _splits(splits)
    prompts = as_texts(prompts) if prompts is not None else none
    columns: dict[str, list] = {
        "name": names,
        "prompt": prompts,
        **{column: cells[column][0] if column in cells else none for column in MOS_COLUMNS},
        "group": as_texts(groups) if groups is not None else prompts,
        "source": [source] * n,
        "split": cells["split"][0] if splits is not None else none,
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
