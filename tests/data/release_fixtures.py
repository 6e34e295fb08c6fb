"""Tiny releases in each official format, written into temporary folders, and broken images."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import scipy.io
from PIL import Image

from mst_clipiqa.data.releases import AIGCIQA2023_MODELS
from mst_clipiqa.data.schema import FEATURES


def write_image(path: Path, *, size: tuple[int, int] = (8, 8), shade: int = 0) -> Path:
    """A small real image, JPEG or PNG by the file's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade % 256, 64, 128)).save(path)
    return path


def write_truncated(path: Path) -> Path:
    """A JPEG cut off halfway through its data."""
    data = write_image(path, size=(64, 64)).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_bomb_png(path: Path, size: tuple[int, int] = (100_000, 100_000)) -> Path:
    """A PNG of a few bytes whose header claims `size` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", *size, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    path.parent.mkdir(parents=True, exist_ok=True)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    path.write_bytes(png)
    return path


def write_table(path: Path, frame: pd.DataFrame, *, header: bool = True) -> Path:
    """A table in the format its extension names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        frame.to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False, header=header)
    elif suffix == ".xlsx":
        frame.to_excel(path, index=False, header=header)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        raise ValueError(suffix)
    return path


AGIQA1K_ROWS = [
    ("deepai_1_1_0_0.jpg", "a red apple", 2.25),
    ("deepai_1_2_0_1.jpg", "a red apple on a table", 3.5),
    ("dreamStudio_8_5_0_1.jpg", "a castle at night", 1.75),
    ("dreamStudio_8_9_1_0.jpg", "a dog in the snow", 4.0),
]


def make_agiqa1k(root: Path, rows: Sequence[tuple[str, str, float]] = AGIQA1K_ROWS, image_dir: str = "file") -> Path:
    """AGIQA-1K: AIGC_MOS_Zscore.xlsx plus the raw AIGC_all.csv (never to be read) and the images."""
    frame = pd.DataFrame(rows, columns=["Image", "Prompt", "MOS"])
    write_table(root / "AIGC_MOS_Zscore.xlsx", frame)
    write_table(root / "AIGC_all.csv", pd.DataFrame({"Image": frame["Image"], "Score": 99.0}))
    for i, name in enumerate(dict.fromkeys(frame["Image"])):
        write_image(root / image_dir / name, shade=i)
    return root


AGIQA3K_ROWS = [
    ("AttnGAN_normal_000.jpg", "a boy", "", "", "baroque", 1.0, 0.3, 2.0, 0.4),
    ("DALLE2_normal_000.jpg", "a boy", "", "", "baroque", 3.5, 0.2, 3.0, 0.5),
    ("glide_lowstep_001.jpg", "a girl, smiling", "smiling", "", "", 0.5, 0.1, 1.5, 0.2),
    ("sd1.5_highcorr_001.jpg", "a girl, smiling", "smiling", "", "", 4.25, 0.6, 4.0, 0.3),
    ("xl2.2_lowcorr_002.jpg", "a house", "", "", "anime", 2.0, 0.4, 0.75, 0.1),
]
AGIQA3K_HEADER = ["name", "prompt", "adj1", "adj2", "style", "mos_quality", "std_quality", "mos_align", "std_align"]


def make_agiqa3k(root: Path, image_dir: str = "img") -> Path:
    """AGIQA-3K: data.csv with the official header, images in `image_dir` ("." for the root itself)."""
    write_table(root / "data.csv", pd.DataFrame(AGIQA3K_ROWS, columns=AGIQA3K_HEADER))
    for i, row in enumerate(AGIQA3K_ROWS):
        write_image(root / image_dir / row[0], shade=i)
    return root


def aigciqa2023_mos(n: int) -> dict[str, np.ndarray]:
    """Distinct MOS per row and file, so that a test can tell which file and row a value came from."""
    rows = np.arange(n, dtype=np.float64)
    return {"mosz1.mat": 30 + rows, "mosz2.mat": 1000 + rows, "mosz3.mat": 2000 + rows}


def make_aigciqa2023(
    root: Path, *, per_model: int = 8, layout: str = "models", first_prompt: int = 0, prompts_header: bool = False
) -> Path:
    """AIGCIQA2023 with `per_model` images per model (the release has 400), its files in the release's shapes.

    Args:
        layout: "models" (Image/<model>/<PPP-k>.png), "pic-index" (the same plus pic-index.xlsx, without a header
            as in the release, whose files are named differently to prove it is preferred), or "flat"
            (Image/allimg/<i>.png).
        first_prompt: the number of the first prompt in the file names (000 or 001).
        prompts_header: AIGCIQA2023_Prompts.xlsx with a header row (some copies); the release's has none: rows of
            (category, subcategory, prompt).
    """
    n = per_model * len(AIGCIQA2023_MODELS)
    for file, values in aigciqa2023_mos(n).items():
        path = root / "DATA" / "MOS" / file
        path.parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(path, {"MOSz": values.reshape(-1, 1)})
    prompts = pd.DataFrame(
        {
            "category": ["Basic"] * (per_model // 4),
            "subcategory": ["Animals"] * (per_model // 4),
            "prompt": [f"prompt number {p}" for p in range(per_model // 4)],
        }
    )
    write_table(root / "AIGCIQA2023_Prompts.xlsx", prompts, header=prompts_header)
    index = []
    for i in range(n):
        model, prompt, k = AIGCIQA2023_MODELS[i // per_model], (i % per_model) // 4, i % 4 + 1
        if layout == "flat":
            write_image(root / "Image" / "allimg" / f"{i}.png", shade=i)
        elif layout == "pic-index":
            index.append((model, f"img{i}.png"))
            write_image(root / "Image" / model / f"img{i}.png", shade=i)
        else:
            write_image(root / "Image" / model / f"{prompt + first_prompt:03d}-{k}.png", shade=i)
    if index:
        write_table(root / "DATA" / "pic-index.xlsx", pd.DataFrame(index), header=False)
    return root


AIGCIQA2023_HUB_ROWS = [
    ("Controlnet/000-1.png", "a corgi", 61.5, 58.0, 44.25),
    ("DALLE/000-1.png", "a corgi", 52.0, 49.5, 40.0),
    ("Glide/001-2.png", "a girl", 30.75, 35.0, 33.5),
]
AIGCIQA2023_HUB_HEADER = ["name", "prompt", "mos_quality", "mos_correspondence", "mos_authenticity"]


def make_aigciqa2023_hub(root: Path, image_dir: str = "images") -> Path:
    """AIGCIQA2023 as a hub copy holds it: data.csv (`AIGCIQA2023_HUB_HEADER`) and the images it names."""
    write_table(root / "data.csv", pd.DataFrame(AIGCIQA2023_HUB_ROWS, columns=AIGCIQA2023_HUB_HEADER))
    for i, row in enumerate(AIGCIQA2023_HUB_ROWS):
        write_image(root / image_dir / row[0], shade=i)
    return root


# (ImageName, MOS1, MOS2) in the release's order, which lists 1000 before 999 (names sorted as text).
EVALMI50K_ROWS = [
    ("DALLE3/001.png", 66.25, 64.5),
    ("DALLE3/002.png", 41.0, 58.75),
    ("DALLE3/010.png", 20.5, 30.25),
    ("Janus/001.png", 55.0, 62.0),
    ("Janus/002.png", 35.5, 25.0),
    ("Janus/010.png", 72.75, 69.5),
]
EVALMI50K_PROMPTS = [f"prompt of row {row}" for row in range(1, 11)]


def make_evalmi50k(root: Path, *, labels_dir: str = "MOS&QA", image_dir: str = ".") -> Path:
    """EvalMi-50K: AIGI2025_MOS_yn.xlsx and question.xlsx in `labels_dir` (as the repository lays them out, or "."
    for flat) and the images `<model>/<NNN>.png` in `image_dir`. Image NNN belongs to prompt row NNN, from 1."""
    labels = pd.DataFrame(EVALMI50K_ROWS, columns=["ImageName", "MOS1", "MOS2"])
    labels["Y/N"] = 1
    for i in range(1, 5):
        labels[f"YN_{i}"] = None
    write_table(root / labels_dir / "AIGI2025_MOS_yn.xlsx", labels)
    questions = pd.DataFrame({"prompt": EVALMI50K_PROMPTS})
    questions["question_1"] = [f"Does the image show {p}? Answer yes or no." for p in EVALMI50K_PROMPTS]
    for i in range(2, 6):
        questions[f"question_{i}"] = None
    write_table(root / labels_dir / "question.xlsx", questions)
    for i, row in enumerate(EVALMI50K_ROWS):
        write_image(root / image_dir / row[0], shade=i)
    return root


AIGIQA20K_TRAIN = [
    ("SD1.4_0000.png", "a boat", 3.25),
    ("SDXL_0001.png", "a boat at sea", 2.0),
    ("DALLE3_0002.png", "a mountain", 4.5),
]
AIGIQA20K_VAL = [("MJ_0003.png", "a lake")]
AIGIQA20K_TEST = [("DALLE2_0004.png", "a forest"), ("SD1.5_0005.png", "a desert")]


def make_aigiqa20k(root: Path, *, header: bool = True, suffix: str = ".csv") -> Path:
    """AIGIQA-20K: info_{train,val,test} with or without a header row, images in train/, val/, test/."""
    for split, rows, columns in (
        ("train", AIGIQA20K_TRAIN, ["name", "prompt", "mos"]),
        ("val", AIGIQA20K_VAL, ["name", "prompt"]),
        ("test", AIGIQA20K_TEST, ["name", "prompt"]),
    ):
        write_table(root / f"info_{split}{suffix}", pd.DataFrame(rows, columns=columns), header=header)
        for i, row in enumerate(rows):
            write_image(root / split / row[0], shade=i)
    return root


def make_table_release(root: Path, rows: Sequence[tuple[str, str | None, object]]) -> Path:
    """A plain release: labels.csv (image,prompt,mos) with PNG images under images/; returns the table."""
    for i, image in enumerate(dict.fromkeys(row[0] for row in rows)):
        write_image(root / image, shade=i)
    return write_table(root / "labels.csv", pd.DataFrame(rows, columns=["image", "prompt", "mos"]))


# A table with one bad row of each kind a user meets most (image, prompt, mos), and the message each row gets.
THREE_BAD_ROWS = [
    ("images/a.png", "a cat", "1.0"),
    ("images/b.png", "a dog", "n/a"),
    ("images/c.png", "a cow", ""),
    ("images/d.png", "a hen", "4.0"),
    ("images/e.png", "a pig", "5.0"),
]
THREE_BAD_REASONS = {
    "2": "mos_quality 'n/a' is not a number",
    "3": "mos_quality is missing",
    "4": "image file not found",
}


def make_three_bad_rows(root: Path) -> Path:
    """`THREE_BAD_ROWS` as labels.csv with its images, d.png left out; returns the table."""
    table = make_table_release(root, THREE_BAD_ROWS)
    (root / "images" / "d.png").unlink()
    return table


def synthetic_dataset(n: int = 100, n_groups: int = 20, splits: Sequence[str | None] | None = None) -> datasets.Dataset:
    """A dataset in the common schema without image files, for split tests."""
    return datasets.Dataset.from_dict(
        {
            "image": [{"path": f"/nowhere/img{i:03d}.png", "bytes": None} for i in range(n)],
            "name": [f"img{i:03d}.png" for i in range(n)],
            "prompt": [f"prompt {i % n_groups}" for i in range(n)],
            "mos_quality": [float(i % 7) for i in range(n)],
            "mos_alignment": [None] * n,
            "mos_authenticity": [None] * n,
            "group": [f"prompt {i % n_groups}" for i in range(n)],
            "source": ["synthetic"] * n,
            "split": list(splits) if splits is not None else [None] * n,
            "bad_cells": [None] * n,
        },
        features=FEATURES,
    )
