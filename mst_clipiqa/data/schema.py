"""The unified table every data source is read into (`FEATURES`), its targets, and how messages about it name rows.

Rows are numbered from 1 in the order of the table, header not counted, in every message and report: row N is
`ds[N - 1]` and the N-th data row of the annotation file (the N-th row of the .mat files for AIGCIQA2023;
AIGIQA-20K counts on through its three tables).
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets

MOS_COLUMNS = ("mos_quality", "mos_alignment", "mos_authenticity")

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
        "bad_cells": {column: datasets.Value("string") for column in (*MOS_COLUMNS, "split")},
    }
)

TARGETS = {
    "quality": "mos_quality",
    "alignment": "mos_alignment",
    "correspondence": "mos_alignment",
    "authenticity": "mos_authenticity",
}

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})

# Split cells as written → the split of the `split` column.
SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}

# Problems listed in an error message or warning; the report file holds all of them.
SHOWN_PROBLEMS = 10

# How every message and report numbers rows.
ROW_NUMBERS = "rows numbered from 1, header not counted"


def target_column(target: str) -> str:
    """The MOS column of a target: a key of `TARGETS` ("quality", ...) or a MOS column name itself."""
    if target in TARGETS:
        return TARGETS[target]
    if target in TARGETS.values():
        return target
    raise ValueError(f"unknown target {target!r}; expected one of {sorted(TARGETS)} or {sorted(set(TARGETS.values()))}")


def row_label(name: str | None, row: int) -> str:
    """How messages name the row at 0-based index `row` of a dataset: its name and its number from 1."""
    return f"{name} (row {row + 1})" if name else f"row {row + 1}"


def summary(header: str, lines: Sequence[str]) -> str:
    """`header` and the first `SHOWN_PROBLEMS` of `lines`, one per line, with the count of the rest."""
    shown = "".join(f"\n  {line}" for line in lines[:SHOWN_PROBLEMS])
    more = f"\n  ... and {len(lines) - SHOWN_PROBLEMS} more" if len(lines) > SHOWN_PROBLEMS else ""
    return f"{header}:{shown}{more}"
