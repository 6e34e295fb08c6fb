"""Readers of the five official releases, each taking a release exactly as its authors publish it.

Readers raise only on what keeps them from reading a release at all (a missing file or column, tables that disagree
in length, a row without an image); problems of single rows are left to `check_dataset`, which names them all at once.
"""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets

from mst_clipiqa.data.cells import (
    as_texts,
    assemble,
    image_files,
    image_names,
    read_frame,
    read_mat,
    table_columns,
)
from mst_clipiqa.data.schema import row_label, summary
from mst_clipiqa.errors import BadRowError

# How deep below a release's root its annotation files and image folders are searched for.
_SEARCH_DEPTH = 2


def load_agiqa1k(root: str | Path) -> datasets.Dataset:
    """Read AGIQA-1K: `AIGC_MOS_Zscore.xlsx` (header `Image,Prompt,MOS`) and its image folder (often `file/`).

    `AIGC_all.csv` holds raw means, not the MOS the papers use, and is never read. The official xlsx lists
    `dreamStudio_8_9_1_1.jpg` twice with different MOS; `check_dataset` rejects both copies.
    """
    root = _existing_dir(root)
    return _image_table("agiqa-1k", root, _find(root, "AIGC_MOS_Zscore.xlsx"), "image", {"mos_quality": "mos"})


_AGIQA3K_HEADER = ("name", "prompt", "adj1", "adj2", "style", "mos_quality", "std_quality", "mos_align", "std_align")


def load_agiqa3k(root: str | Path) -> datasets.Dataset:
    """Read AGIQA-3K: `data.csv` with header `name,prompt,adj1,adj2,style,mos_quality,std_quality,mos_align,std_align`.

    `mos_align` becomes `mos_alignment`. The images lie in the root, `img/`, `images/` or another subfolder,
    depending on who unpacked them: the folder holding most of the listed names is used. A hub copy holding the
    official data.csv reads the same way.
    """
    root = _existing_dir(root)
    mos = {"mos_quality": "mos_quality", "mos_alignment": "mos_align"}
    return _image_table("agiqa-3k", root, _find(root, "data.csv"), "name", mos, expected=_AGIQA3K_HEADER)


AIGCIQA2023_MODELS = ("Controlnet", "DALLE", "Glide", "Lafite", "stable-diffusion", "Unidiffuser")
_AIGCIQA2023_MOS = {"mos_quality": "mosz1.mat", "mos_authenticity": "mosz2.mat", "mos_alignment": "mosz3.mat"}
_AIGCIQA2023_HUB_MOS = {
    "mos_quality": "mos_quality",
    "mos_alignment": "mos_correspondence",
    "mos_authenticity": "mos_authenticity",
}
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

    A hub copy, without the .mat files, holds the images and a `data.csv` naming them, with the columns name, prompt,
    mos_quality, mos_correspondence and mos_authenticity.
    """
    root = _existing_dir(root)
    if _find(root, _AIGCIQA2023_MOS["mos_quality"], required=False) is None:
        hub_table = _find(root, "data.csv", required=False)
        if hub_table is not None:
            return _image_table("aigciqa2023", root, hub_table, "name", _AIGCIQA2023_HUB_MOS)
    mos_files = {column: _find(root, file) for column, file in _AIGCIQA2023_MOS.items()}
    mos = {column: read_mat(file, "MOSz") for column, file in mos_files.items()}
    quality_file = mos_files["mos_quality"]
    n = len(mos["mos_quality"])
    if any(len(values) != n for values in mos.values()):
        lengths = ", ".join(f"{_AIGCIQA2023_MOS[c]}: {len(v)}" for c, v in mos.items())
        raise BadRowError(f"{quality_file.parent}: the MOS files differ in length ({lengths})")
    block = len(AIGCIQA2023_MODELS) * _PER_PROMPT
    if n == 0 or n % block:
        raise BadRowError(f"{quality_file}: {n} rows; expected a multiple of {block} (6 models x 4 images per prompt)")
    per_model = n // len(AIGCIQA2023_MODELS)

    prompts_file = _find(root, "AIGCIQA2023_Prompts.xlsx")
    prompts = _aigciqa2023_prompts(prompts_file)
    if len(prompts) != per_model // _PER_PROMPT:
        raise BadRowError(
            f"{prompts_file}: {len(prompts)} prompts, but {quality_file} holds {n} rows, which need "
            f"{per_model // _PER_PROMPT} (4 images per prompt and model)"
        )

    folder, names = _aigciqa2023_images(root, n)
    return assemble(
        "aigciqa2023",
        root,
        names,
        image_files(folder, names),
        prompts=[prompts[_aigciqa2023_place(i, per_model)[1]] for i in range(n)],
        mos=mos,
    )


def _aigciqa2023_prompts(path: Path) -> list[Any]:
    """The prompt cells of `AIGCIQA2023_Prompts.xlsx`, one per row, read with or without a header row.

    The file as the release's repository holds it has no header: rows of (category, subcategory, prompt), the
    first `Basic | Animals | a corgi`; there the prompt is the last column. Copies with a header row name the
    column `prompt`.
    """
    frame = read_frame(path, header=False)
    if frame.empty:
        raise BadRowError(f"{path}: no prompts")
    first = as_texts(frame.iloc[0])
    if "prompt" in (cell.lower() for cell in first if cell is not None):
        return table_columns(frame.iloc[1:].set_axis(first, axis=1), path, ("prompt",))["prompt"]
    return frame.iloc[:, -1].tolist()


def _aigciqa2023_place(row: int, per_model: int) -> tuple[str, int, int]:
    """(model, prompt index from 0, image number k from 1) of an AIGCIQA2023 row."""
    return AIGCIQA2023_MODELS[row // per_model], (row % per_model) // _PER_PROMPT, row % _PER_PROMPT + 1


def _aigciqa2023_images(root: Path, n: int) -> tuple[Path, list[str]]:
    """The image folder of AIGCIQA2023 and each row's path below it."""
    per_model = n // len(AIGCIQA2023_MODELS)
    index_file = _find(root, "pic-index.xlsx", required=False)
    if index_file is not None:
        frame = read_frame(index_file, header=None, name_at=1)
        if len(frame) != n or frame.shape[1] < 2:
            raise BadRowError(
                f"{index_file}: expected {n} rows of (model, file), found {len(frame)} x {frame.shape[1]}"
            )
        models = image_names(frame.iloc[:, 0].tolist(), index_file)
        files = image_names(frame.iloc[:, 1].tolist(), index_file)
        return _find(root, f"{models[0]}/").parent, [f"{model}/{file}" for model, file in zip(models, files)]

    probe = _find(root, f"{AIGCIQA2023_MODELS[0]}/", required=False)
    if probe is not None:
        # Both numberings of the prompt folders' files are plausible; the first model's folder tells which.
        first = 1 if (probe / "001-1.png").exists() and not (probe / "000-1.png").exists() else 0
        places = (_aigciqa2023_place(i, per_model) for i in range(n))
        return probe.parent, [f"{model}/{prompt + first:03d}-{k}.png" for model, prompt, k in places]

    flat = _find(root, "allimg/", required=False)
    if flat is not None:
        return flat.parent, [f"allimg/{i}.png" for i in range(n)]
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
    """
    root = _existing_dir(root)
    names: list[str] = []
    images: list[dict[str, Any]] = []
    prompts: list[Any] = []
    mos: list[Any] = []
    splits: list[str] = []
    for split in ("train", "val", "test"):
        table = _find(root, f"info_{split}.csv", f"info_{split}.xlsx", required=split == "train")
        if table is None:
            continue
        required = ("name", "prompt", "mos") if split == "train" else ("name", "prompt")
        rows = table_columns(read_frame(table, header=None), table, required, optional=("mos",))
        part = image_names(rows["name"], table)
        names += part
        images += image_files(_find_image_dir(root, part, table), part)
        prompts += rows["prompt"]
        mos += rows.get("mos", [None] * len(part))
        splits += [split] * len(part)
    names = _names_of_files(names, images, root)
    return assemble("aigiqa-20k", root, names, images, prompts=prompts, mos={"mos_quality": mos}, splits=splits)


EVALMI50K_MOS = "AIGI2025_MOS_yn.xlsx"
EVALMI50K_PROMPTS = "question.xlsx"


def load_evalmi50k(root: str | Path) -> datasets.Dataset:
    """Read EvalMi-50K (LMM4LMM): `AIGI2025_MOS_yn.xlsx`, `question.xlsx` and the images.

    The MOS file has a header `ImageName,MOS1,MOS2,Y/N,YN_1..YN_4`, one row per image; `ImageName` is
    `<model>/<NNN>.png`. MOS1 (perception) is quality, MOS2 (text-image correspondence) becomes `mos_alignment`; the
    yes/no answers are not read. `question.xlsx` (header `prompt,question_1..question_5`) lists the prompts: image
    `<NNN>` was generated from its NNN-th data row, counted from 1 (in the release, the number of yes/no answers of
    each image changes at the same rows as the number of questions of that row, and at no other). The labels may
    lie as the repository lays them out (`MOS&QA/`) or flat.
    """
    root = _existing_dir(root)
    table = _find(root, EVALMI50K_MOS)
    rows = table_columns(read_frame(table), table, ("imagename", "mos1", "mos2"))
    names = image_names(rows["imagename"], table)
    prompts_file = _find(root, EVALMI50K_PROMPTS)
    prompts = table_columns(read_frame(prompts_file), prompts_file, ("prompt",))["prompt"]

    def prompt_row(name: str) -> int | None:
        number = Path(name).stem
        return int(number) - 1 if number.isdigit() and 0 < int(number) <= len(prompts) else None

    places = [prompt_row(name) for name in names]
    unplaced = [row_label(name, row) for row, (name, place) in enumerate(zip(names, places)) if place is None]
    if unplaced:
        header = (
            f"{table}: {len(unplaced)} image names are not <model>/<NNN>.png with NNN a row of {prompts_file} "
            f"(1 to {len(prompts)})"
        )
        raise BadRowError(summary(header, unplaced))
    return assemble(
        "evalmi-50k",
        table,
        names,
        image_files(_find_image_dir(root, names, table), names),
        prompts=[prompts[place] for place in places],
        mos={"mos_quality": rows["mos1"], "mos_alignment": rows["mos2"]},
    )


def _image_table(
    source: str,
    root: Path,
    table: Path,
    name_column: str,
    mos: dict[str, str],
    *,
    expected: Sequence[str] | None = None,
) -> datasets.Dataset:
    """A release's table of one image per row: its `name_column` (the image, below the folder that holds most of the
    names), `prompt` and the MOS columns `mos` ({feature: column}); `expected` is the official header, if any."""
    rows = table_columns(read_frame(table), table, (name_column, "prompt", *mos.values()), expected=expected)
    names = image_names(rows[name_column], table)
    return assemble(
        source,
        table,
        names,
        image_files(_find_image_dir(root, names, table), names),
        prompts=rows["prompt"],
        mos={feature: rows[column] for feature, column in mos.items()},
    )


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


RELEASES: dict[str, Callable[[str | Path], datasets.Dataset]] = {
    "agiqa-1k": load_agiqa1k,
    "agiqa-3k": load_agiqa3k,
    "aigciqa2023": load_aigciqa2023,
    "aigiqa-20k": load_aigiqa20k,
    "evalmi-50k": load_evalmi50k,
}
"""The official releases by `data.source` name."""


# ---------------------------------------------------------------------------------------------------------------------
# Files and folders of a release
# ---------------------------------------------------------------------------------------------------------------------


def _existing_dir(root: str | Path) -> Path:
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    return root


def _search_dirs(root: Path) -> list[Path]:
    """The root, then its subfolders level by level (sorted, hidden ones skipped), `_SEARCH_DEPTH` levels down."""
    found = [root]
    for depth in range(1, _SEARCH_DEPTH + 1):
        found += sorted(root.joinpath(folder) for folder in glob.glob("*/" * depth, root_dir=root))
    return found


def _find(root: Path, *names: str, required: bool = True) -> Path | None:
    """The first of `names` (files, or folders where a name ends in "/") in the root or below it; None (or an error
    when required) if none is there."""
    for folder in _search_dirs(root):
        for name in names:
            path = folder / name
            if path.is_dir() if name.endswith("/") else path.is_file():
                return path
    if required:
        raise FileNotFoundError(
            f"{root}: no {' or '.join(names)} in this folder or its subfolders {_SEARCH_DEPTH} levels down"
        )
    return None


def _find_image_dir(root: Path, names: Sequence[str], table: Path) -> Path:
    """The folder, the root or one below it, that holds most of `names` (the first such folder on a tie).

    Names missing from the chosen folder are left to `check_dataset` to report.
    """
    # Names may be paths (`DALLE3/001.png`): each subfolder is listed once, not each name looked up.
    wanted: dict[str, set[str]] = defaultdict(set)
    for name in names:
        parent, _, file = name.rpartition("/")
        wanted[parent].add(file)
    total = sum(len(files) for files in wanted.values())
    best, best_hits = None, 0
    searched = _search_dirs(root)
    for folder in searched:
        hits = sum(
            len(files.intersection(os.listdir(folder / parent)))
            for parent, files in wanted.items()
            if (folder / parent).is_dir()
        )
        if hits > best_hits:
            best, best_hits = folder, hits
        if hits == total:
            break
    if best is None:
        header = f"{table}: none of its {total} images is in any of these folders"
        raise FileNotFoundError(summary(header, [str(folder) for folder in searched]))
    return best
