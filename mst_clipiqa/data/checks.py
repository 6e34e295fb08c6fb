"""The setup check (`check_dataset`): every problem of the unified table found in one pass before any training and
named in one message, with a report of every bad row; and the check of single images it uses."""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import datasets

from mst_clipiqa.data.preprocess import open_image
from mst_clipiqa.data.schema import ROW_NUMBERS, SPLITS, row_label, summary, target_column
from mst_clipiqa.errors import BadImageError, BadRowError

logger = logging.getLogger(__name__)


def check_dataset(
    ds: datasets.Dataset,
    *,
    target: str,
    need_prompt: bool,
    check_images: bool | Callable[[datasets.Dataset], Iterable[tuple[int, str]]] = True,
    on_bad: Literal["error", "drop"] = "error",
    report_path: str | Path | None = None,
    num_threads: int = 8,
) -> datasets.Dataset:
    """Find every problem of a dataset before training, and refuse it or drop the rows at fault.

    A row is bad when its name is missing or listed more than once (every copy is bad: with two MOS for one
    image neither can be trusted), its target MOS is missing, not a number or not finite, its split cell names
    no known split, its image is missing, unreadable, truncated or a decompression bomb, or, with `need_prompt`,
    its prompt is missing or blank. Rows of the official val/test splits without a target MOS are not bad: their
    labels are withheld and they are for prediction (see `splits.predict_indices`).

    Messages and the report quote a bad cell as the file holds it. `check_images` True decodes every image fully (in
    `num_threads` threads); a function of `ds` checks them its own way and returns (row, reason) for every bad image,
    e.g. the feature cache's encoding pass, which decodes only the images it lacks; False skips them.

    `on_bad` "error" raises one error (BadImageError when only images are bad, else BadRowError) naming the file, the
    number of bad rows and the first of them with all their problems; "drop" logs the same as a warning and returns
    the rows without problems (`ds` itself when nothing is wrong). `report_path`, in both modes, gets every problem
    as CSV (`name,row,reason`, one line per bad row).
    """
    column = target_column(target)
    if on_bad not in ("error", "drop"):
        raise ValueError(f'on_bad must be "error" or "drop", not {on_bad!r}')
    meta = ds.select_columns(["name", "prompt", column, "split", "bad_cells", "source"]).to_dict()
    # Readers record the file the rows came from; a dataset built otherwise is named by its source.
    origin = ds.info.description or (meta["source"][0] if len(ds) else "the data")
    if need_prompt:
        require_prompts(meta["prompt"], origin)
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
            problems[row].append(f"split {bad['split']!r} is none of {', '.join(sorted(SPLITS))}")
        if need_prompt and not (prompt and prompt.strip()):
            problems[row].append("prompt is missing")
    image_only = not problems
    if check_images:
        found = check_images(ds) if callable(check_images) else image_problems(ds, num_threads)
        for row, problem in found:
            problems[row].append(problem)
    if not problems:
        return ds

    lines = [f"{row_label(names[row], row)}: {'; '.join(reasons)}" for row, reasons in sorted(problems.items())]
    header = f"{origin}: {len(problems)} bad rows of {len(ds)} ({ROW_NUMBERS})"
    if report_path is not None:
        _write_report(report_path, names, problems)
        header += f"; all are listed in {report_path}"
    if on_bad == "error":
        error = BadImageError if image_only else BadRowError
        raise error(
            summary(f'{header}. Fix them, or set on_bad to "drop" (--data.on_bad drop) to leave them out', lines)
        )
    logger.warning(summary(f"{header}. Dropping them", lines))
    return ds.select([row for row in range(len(ds)) if row not in problems])


def require_prompts(prompts: Sequence[str | None], origin: str) -> None:
    """Stop (BadRowError), before any image is decoded or encoded, when the prompt head gets rows none of which has a
    prompt: the prompt column is not mapped (or not filled), and leaving out the rows without one would leave out
    every row. Training's setup check and `mst-clipiqa score` both ask this."""
    if prompts and not any(prompt and prompt.strip() for prompt in prompts):
        raise BadRowError(
            f"{origin}: none of its {len(prompts)} images has a prompt, and the prompt head (variant B) scores each "
            "image against its generation prompt: map the column of prompts (score: --prompt_column COLUMN of a "
            "table; training: --data.source_options.prompt_column COLUMN)"
        )


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
    """Every bad row as CSV: `name,row,reason`, rows numbered from 1, a row's reasons joined by "; "."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["name", "row", "reason"])
        for row, reasons in sorted(problems.items()):
            writer.writerow([names[row], row + 1, "; ".join(reasons)])
