"""Stand-ins of the five benchmarks and of the OpenAI CLIP towers, for measuring the whole protocol at real size.

`make_standins` draws the demo's scenes (mst_clipiqa.demo.synthetic) at each release's image count, sizes and file
formats, with its annotation files, so that the package's readers and the configs in experiments/ take them
unchanged. `build_random_hub_cache` writes random-weight CLIPs of the exact shapes of openai/clip-vit-base-patch32
and -patch16 as a Hugging Face hub cache, so configs naming those ids load offline. Scores on either mean nothing:
they measure speed and memory, and exercise the pipeline.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
from PIL import Image

from mst_clipiqa.data.releases import AIGCIQA2023_MODELS
from mst_clipiqa.demo.synthetic import (
    ADJ1,
    ADJ2,
    DISTORTIONS,
    HEADER,
    LEVELS,
    MISALIGNED_SHARE,
    STYLES,
    _alignment,
    _describe,
    _distort,
    _draw_plan,
    _mos,
    _perturb,
    _quality,
    _render,
    _Scene,
)
from mst_clipiqa.demo.tiny_clip import _save_clip

STANDIN_FOLDERS = {
    "agiqa-1k": "AGIQA-1K",
    "agiqa-3k": "AGIQA-3K",
    "aigciqa2023": "AIGCIQA2023",
    "aigiqa-20k": "AIGIQA-20K",
    "evalmi-50k": "EvalMi-50K",
}
"""Benchmark (its `data.source`) → the folder of its stand-in, named as the configs' `data.root` name it."""
RELEASE_IMAGES = {"agiqa-1k": 1080, "agiqa-3k": 2982, "aigciqa2023": 2400, "aigiqa-20k": 20000, "evalmi-50k": 50400}
"""Images of each benchmark's release: a stand-in's size at scale 1."""
STANDIN_MARKER = "standin.json"
STANDIN_VERSION = 2
"""Bump when the drawing or a layout changes, so that existing stand-ins are redrawn rather than reused."""
PNG_COMPRESSION = 1
"""zlib level of the PNG files: level 1 writes much faster than Pillow's default (6), for slightly larger files that
decode as fast."""

DRAWING_SIDE = 320
"""Long side, in pixels, at which the stand-ins' scenes are drawn and distorted (the demo draws at 256-320)."""

AGIQA1K_MODELS = ("deepai", "dreamStudio")
# Per generator: the distortion level its images usually get (generators differ in quality, as in the releases)
# and the image size.
AGIQA3K_MODELS = {
    "AttnGAN": (3, 512),
    "DALLE2": (1, 1024),
    "glide": (2, 512),
    "midjourney": (0, 1024),
    "sd1.5": (1, 512),
    "xl2.2": (0, 1024),
}
AGIQA3K_CONDITIONS = ("normal", "lowstep", "highcorr", "lowcorr")
AGIQA3K_PROMPTS = 300
AIGCIQA2023_LEVELS = (1, 1, 3, 3, 1, 2)
"""The usual distortion level of each of `AIGCIQA2023_MODELS`."""
AIGIQA20K_GENERATORS = {
    "SD1.4": (2, (512, 512)),
    "SD1.5": (2, (512, 512)),
    "LCM_SD1.5": (3, (512, 512)),
    "DALLE2": (1, (512, 512)),
    "IF": (2, (512, 512)),
    "Kandinsky": (1, (768, 768)),
    "Wuerstchen": (2, (768, 768)),
    "MJ": (0, (1024, 768)),
    "Playground": (0, (768, 1024)),
    "DALLE3": (0, (1024, 1024)),
    "SDXL": (1, (1024, 1024)),
    "SSD1B": (1, (1024, 1024)),
    "LCM_SDXL": (3, (1024, 1024)),
    "Pixart_alpha": (1, (1024, 1024)),
    "LCM_Pixart": (3, (1024, 1024)),
}
AIGIQA20K_PARTS = {"train": 14000, "val": 2000, "test": 4000}
"""AIGIQA-20K's official split; only train is labelled in the challenge release."""
AIGIQA20K_PER_PROMPT = 5
"""Images per prompt in the AIGIQA-20K stand-in, each by another generator."""
EVALMI50K_MODELS = {
    "ali_flux_schnell": (0, 1024),
    "DALLE3": (0, 1024),
    "ELLA": (1, 512),
    "EMU3": (1, 720),
    "hart": (1, 1024),
    "i-Code-V3": (3, 512),
    "Infinity": (0, 1024),
    "Janus": (2, 384),
    "Kandinsky-3": (1, 1024),
    "Kolors": (0, 1024),
    "LaVi-Bridge": (2, 512),
    "LlamaGen_256": (3, 256),
    "LLMGA": (2, 1024),
    "LWM": (3, 256),
    "NOVA": (1, 1024),
    "omnigen": (1, 1024),
    "PixArt-sigma": (0, 1024),
    "playground": (0, 1024),
    "sd_v2-1": (2, 768),
    "sd3_5_large": (0, 1024),
    "sdxl_base_1": (1, 1024),
    "seed-xi": (2, 1024),
    "Show-o": (2, 512),
    "vila-u": (3, 256),
}
"""EvalMi-50K's 24 generators, as its image folders are named: the distortion level their images usually get and
their side in pixels (the generators' usual output sizes, approximately)."""
EVALMI50K_PROMPTS = 2100


@dataclass(frozen=True)
class _Shot:
    """One image of a scene."""

    path: str  # below the release folder
    size: tuple[int, int]  # (width, height)
    level: int  # distortion level, 0 undistorted
    misdrawn: bool  # drawn with a colour, shape or relation other than its prompt says


Scenes = list[tuple[_Shot, ...]]


@dataclass(frozen=True)
class _SceneTask:
    """One scene for a drawing process: its images, and where its random choices come from."""

    root: Path
    seed: int
    tag: int  # the benchmark's place in `STANDIN_FOLDERS`
    index: int  # the scene's place in its benchmark
    shots: tuple[_Shot, ...]


@dataclass
class _Release:
    """A stand-in planned before any image is drawn: its scenes, one prompt each, and how to write its tables."""

    scenes: Scenes
    write_tables: Callable[[Path, list[str]], None]
    """Writes the annotation files into the release folder, given each scene's prompt."""


@dataclass
class StandIns:
    """What `make_standins` made."""

    roots: dict[str, Path]
    """Benchmark → the folder of its stand-in."""
    images: dict[str, int]
    """Benchmark → the number of images of its stand-in."""
    drawn: int
    """Images drawn by this call: 0 when every stand-in already existed."""


def make_standins(
    folder: str | Path,
    sources: Sequence[str] = tuple(STANDIN_FOLDERS),
    *,
    scale: float = 1.0,
    seed: int = 0,
    withhold_labels: bool = False,
    workers: int | None = None,
) -> StandIns:
    """Write stand-ins of the benchmarks in `sources` under `folder`, each in its release's official layout, or reuse
    the ones a call with the same arguments wrote.

    At scale 1 each has its release's size: AGIQA-1K 1,080 JPEGs of 512 x 512 (six per prompt); AGIQA-3K 2,982 PNGs
    of 512-1024 px over 300 prompts; AIGCIQA2023 2,400 PNGs of 512 x 512 (6 generators x 100 prompts x 4) with
    quality, authenticity and correspondence MOS; AIGIQA-20K 14,000 train, 2,000 val and 4,000 test PNGs of 512-1024
    px from 15 generators; EvalMi-50K 50,400 PNGs of 256-1024 px (24 generators x 2,100 prompts) with perception and
    correspondence MOS. `scale` multiplies every count, prompts included, down to the least that still gives each
    benchmark's protocol (see experiments/) a validation and a test part of 2 rows or more. Scenes are drawn at
    `DRAWING_SIDE` px, distorted there and then resized to the image size, so a level looks alike at every size; MOS
    follow the level (and, for alignment, whether an image was drawn wrong), on each release's scale. Images are
    drawn in `workers` processes; the same arguments give the same files. A marker file in each folder records the
    arguments and is marked complete last, so a complete stand-in is reused and an incomplete or different one
    redrawn.

    Args:
        folder: where the stand-ins go, each in its `STANDIN_FOLDERS` subfolder.
        sources: the benchmarks, by `data.source` name (keys of `STANDIN_FOLDERS`).
        scale: the share of each release's size to draw (1/20 = 0.05).
        seed: seed of every random choice.
        withhold_labels: write AIGIQA-20K's info_val and info_test without MOS, as the challenge released them. By
            default they hold MOS, as the copies with the labels published after the challenge do, so that the
            official split has a test part.
        workers: processes drawing images; None for one per CPU.

    Raises:
        ValueError: an unknown source, or a scale that is not a positive number.
        FileExistsError: a stand-in's folder holds files that no stand-in wrote (a real release, say).
    """
    unknown = [source for source in sources if source not in STANDIN_FOLDERS]
    if unknown:
        raise ValueError(f"no stand-in of {', '.join(unknown)}; known: {', '.join(STANDIN_FOLDERS)}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, not {scale}")
    folder = Path(folder)
    todo: list[tuple[Path, int, dict, _Release]] = []
    images = {}
    for source in sources:
        root = folder / STANDIN_FOLDERS[source]
        tag = list(STANDIN_FOLDERS).index(source)
        release = _PLANS[source](np.random.default_rng([seed, tag]), scale, withhold_labels)
        images[source] = sum(map(len, release.scenes))
        marker = {"generator": "mst_clipiqa stand-in", "source": source, "version": STANDIN_VERSION}
        marker |= {"scale": scale, "seed": seed}
        if source == "aigiqa-20k":
            marker["withhold_labels"] = withhold_labels
        if _read_marker(root) == {**marker, "complete": True}:
            continue
        _clear(root)
        (root / STANDIN_MARKER).write_text(json.dumps({**marker, "complete": False}))
        todo.append((root, tag, marker, release))

    tasks = [
        _SceneTask(root, seed, tag, index, shots)
        for root, tag, _, release in todo
        for index, shots in enumerate(release.scenes)
    ]
    for parent in {(task.root / shot.path).parent for task in tasks for shot in task.shots}:
        parent.mkdir(parents=True, exist_ok=True)
    prompts = _draw(tasks, workers or os.cpu_count() or 1)
    for root, _, marker, release in todo:
        release.write_tables(root, prompts[: len(release.scenes)])
        prompts = prompts[len(release.scenes) :]
        (root / STANDIN_MARKER).write_text(json.dumps({**marker, "complete": True}))
    return StandIns(
        roots={source: folder / STANDIN_FOLDERS[source] for source in sources},
        images=images,
        drawn=sum(len(task.shots) for task in tasks),
    )


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / STANDIN_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _clear(root: Path) -> None:
    """An empty `root`: an earlier stand-in's is removed; any other content is refused."""
    marker = _read_marker(root)
    if isinstance(marker, dict) and marker.get("generator") == "mst_clipiqa stand-in":
        shutil.rmtree(root)
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} holds files that are not a stand-in; choose another folder")
    root.mkdir(parents=True, exist_ok=True)


def _draw(tasks: list[_SceneTask], workers: int) -> list[str]:
    """The prompt of each task's scene, its images drawn and saved in `workers` processes."""
    workers = min(workers, len(tasks))
    if workers <= 1:
        return [_draw_scene(task) for task in tasks]
    # Forked workers start at once: they need numpy and Pillow only, where spawned ones would import again whatever
    # the caller has loaded (torch, Lightning) before drawing anything.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    with context.Pool(workers) as pool:
        return pool.map(_draw_scene, tasks, chunksize=max(1, len(tasks) // (8 * workers)))


def _draw_scene(task: _SceneTask) -> str:
    """Draw one scene's images and save them; returns its prompt. Depends only on (seed, tag, index)."""
    rng = np.random.default_rng([task.seed, task.tag, task.index])
    scene = _draw_plan(rng)
    misdrawn = _misdrawn(scene, rng)
    distortion = str(rng.choice(DISTORTIONS))
    clean: dict[tuple[bool, tuple[int, int]], Image.Image] = {}
    for shot in task.shots:
        key = (shot.misdrawn, _drawing_size(shot.size))
        if key not in clean:
            clean[key] = _render(replace(misdrawn if shot.misdrawn else scene, size=key[1]))
        image = _distort(clean[key], distortion, shot.level, rng).resize(shot.size, Image.Resampling.BILINEAR)
        path = task.root / shot.path
        if path.suffix == ".png":
            image.save(path, format="PNG", compress_level=PNG_COMPRESSION)
        else:
            image.save(path, format="JPEG", quality=95)
    return _describe(scene)


def _drawing_size(size: tuple[int, int]) -> tuple[int, int]:
    """The size a scene is drawn and distorted at before resizing to `size`: `DRAWING_SIDE` on the long side, so that
    the images of one scene and aspect share one drawing, and a distortion level looks alike at every image size."""
    factor = DRAWING_SIDE / max(size)
    return round(size[0] * factor), round(size[1] * factor)


def _misdrawn(scene: _Scene, rng: np.random.Generator) -> _Scene:
    """The scene as a generator that misread its prompt draws it: one colour, shape or relation wrong."""
    wrong = _perturb(scene, rng)
    if wrong.relation == scene.relation:
        return wrong
    # The drawing places shapes by cell, not by the relation's words: swap the first two to draw the other relation.
    first, second, *rest = scene.shapes
    return replace(scene, shapes=(replace(first, cell=second.cell), replace(second, cell=first.cell), *rest))


def _zscore(value: float) -> float:
    """A MOS on 0-5 as AIGCIQA2023's z-scores rescaled around 50 (0.05 → 27, 4.95 → 71)."""
    return 50 + 9 * (value - 2.6)


def _scaled(count: int, scale: float, least: int) -> int:
    return max(least, round(count * scale))


def _counts(n: int, parts: int) -> list[int]:
    """`n` dealt into `parts` near-equal counts, the larger first."""
    size, extra = divmod(n, parts)
    return [size + 1] * extra + [size] * (parts - extra)


def _per_image(prompts: list[str], scenes: Scenes) -> list[str]:
    return [prompt for prompt, shots in zip(prompts, scenes) for _ in shots]


def _level(usual: int, rng: np.random.Generator, extra: int = 0) -> int:
    """A distortion level near a generator's usual one."""
    return min(max(usual + extra + int(rng.integers(-1, 2)), 0), LEVELS - 1)


def _plan_agiqa1k(rng: np.random.Generator, scale: float, withhold_labels: bool) -> _Release:
    """AGIQA-1K: JPEGs of 512 x 512 in file/, six per prompt (two generators, three each); AIGC_MOS_Zscore.xlsx."""
    # 20 rows: the random protocol's validation and test parts get 2 or more.
    n = _scaled(RELEASE_IMAGES["agiqa-1k"], scale, 20)
    scenes: Scenes = []
    names, mos = [], []
    for index, size in enumerate(_counts(n, math.ceil(n / 6))):
        shots = []
        for j in range(size):
            # {model}_{main}_{second}_{place}_{style}.jpg, as the release names them
            name = f"{AGIQA1K_MODELS[j % 2]}_{index + 1}_{j // 2 + 1}_{index % 2}_{index // 2 % 2}.jpg"
            level = int(rng.integers(0, LEVELS))
            shots.append(_Shot(f"file/{name}", (512, 512), level, False))
            names.append(name)
            mos.append(round(_quality(level, rng), 4))
        scenes.append(tuple(shots))

    def write_tables(root: Path, prompts: list[str]) -> None:
        frame = pd.DataFrame({"Image": names, "Prompt": _per_image(prompts, scenes), "MOS": mos})
        frame.to_excel(root / "AIGC_MOS_Zscore.xlsx", index=False)

    return _Release(scenes, write_tables)


def _plan_agiqa3k(rng: np.random.Generator, scale: float, withhold_labels: bool) -> _Release:
    """AGIQA-3K: PNGs of 512-1024 px in images/, each prompt drawn by about 10 of its 6 generators x 4 conditions
    (lowstep: more distorted, lowcorr: drawn wrong); data.csv."""
    n_prompts = _scaled(AGIQA3K_PROMPTS, scale, 10)  # prompt-disjoint splits of 10 prompts validate on 1, test on 2
    n = max(round(RELEASE_IMAGES["agiqa-3k"] * scale), 2 * n_prompts)
    combos = [(model, condition) for model in AGIQA3K_MODELS for condition in AGIQA3K_CONDITIONS]
    scenes: Scenes = []
    rows = []  # name, adj1, adj2, style, mos_quality, std_quality, mos_align, std_align
    for index, size in enumerate(_counts(n, n_prompts)):
        adj1, adj2, style = (str(rng.choice(words)) for words in (ADJ1, ADJ2, STYLES))
        shots = []
        for combo in sorted(rng.choice(len(combos), size=size, replace=False)):
            model, condition = combos[combo]
            usual, side = AGIQA3K_MODELS[model]
            level = _level(usual, rng, extra=condition == "lowstep")
            misdrawn = condition == "lowcorr"
            name = f"{model}_{condition}_{index:03d}.png"
            shots.append(_Shot(f"images/{name}", (side, side), level, misdrawn))
            mos = _quality(level, rng), rng.uniform(0.3, 0.7), _alignment(level, misdrawn, rng), rng.uniform(0.3, 0.7)
            rows.append([name, adj1, adj2, style, *mos])
        scenes.append(tuple(shots))

    def write_tables(root: Path, prompts: list[str]) -> None:
        with open(root / "data.csv", "w", newline="", encoding="utf-8") as table:
            writer = csv.writer(table, lineterminator="\n")
            writer.writerow(HEADER)
            for prompt, (name, *words, q, sq, a, sa) in zip(_per_image(prompts, scenes), rows):
                writer.writerow([name, prompt, *words, *(f"{value:.4f}" for value in (q, sq, a, sa))])

    return _Release(scenes, write_tables)


def _plan_aigciqa2023(rng: np.random.Generator, scale: float, withhold_labels: bool) -> _Release:
    """AIGCIQA2023: 6 generators x prompts x 4 PNGs of 512 x 512 in Image/<model>/<PPP-k>.png; quality, authenticity
    and correspondence in DATA/MOS/mosz{1,2,3}.mat, their spreads in DATA/STD/SD{1,2,3}.mat;
    AIGCIQA2023_Prompts.xlsx."""
    per_prompt = len(AIGCIQA2023_MODELS) * 4
    n_prompts = _scaled(RELEASE_IMAGES["aigciqa2023"] // per_prompt, scale, 1)  # one prompt's 24 are enough
    n = per_prompt * n_prompts
    mos = np.zeros((3, n))  # quality, authenticity, correspondence: the rows of mosz1, mosz2, mosz3
    scenes: Scenes = []
    for prompt in range(n_prompts):
        shots = []
        for model_index, (model, usual) in enumerate(zip(AIGCIQA2023_MODELS, AIGCIQA2023_LEVELS)):
            for k in range(1, 5):
                level = _level(usual, rng)
                misdrawn = bool(rng.random() < MISALIGNED_SHARE)
                shots.append(_Shot(f"Image/{model}/{prompt:03d}-{k}.png", (512, 512), level, misdrawn))
                # The release's row order: by model, then prompt, then image (see releases.load_aigciqa2023).
                row = (model_index * n_prompts + prompt) * 4 + k - 1
                quality = _quality(level, rng)
                # Authenticity follows the distortion too, more loosely than quality.
                authenticity = _mos(quality + rng.normal(0, 0.4))
                mos[:, row] = [_zscore(v) for v in (quality, authenticity, _alignment(level, misdrawn, rng))]
        scenes.append(tuple(shots))
    styles = [str(rng.choice(STYLES)) for _ in range(n_prompts)]
    spreads = rng.uniform(8, 14, (3, n))

    def write_tables(root: Path, prompts: list[str]) -> None:
        for kind, variable, values in (("MOS", "MOSz", mos), ("STD", "SD", spreads)):
            (root / "DATA" / kind).mkdir(parents=True, exist_ok=True)
            for i, column in enumerate(values, 1):
                name = f"mosz{i}.mat" if kind == "MOS" else f"SD{i}.mat"
                scipy.io.savemat(root / "DATA" / kind / name, {variable: np.round(column, 4).reshape(-1, 1)})
        # As the release holds it: no header row, (category, subcategory, prompt) per row.
        frame = pd.DataFrame({"category": styles, "subcategory": "shapes", "prompt": prompts})
        frame.to_excel(root / "AIGCIQA2023_Prompts.xlsx", index=False, header=False)

    return _Release(scenes, write_tables)


def _plan_aigiqa20k(rng: np.random.Generator, scale: float, withhold_labels: bool) -> _Release:
    """AIGIQA-20K: PNGs of 512-1024 px named <generator>_<NNNN>.png in train/, val/ and test/, five generators per
    prompt; info_train.csv (name,prompt,mos) and info_val.csv, info_test.csv (name,prompt and, unless withheld, mos)."""
    # 20 training rows leave 2 to validate on when the official val labels are withheld.
    parts = {part: _scaled(n, scale, 20 if part == "train" else 2) for part, n in AIGIQA20K_PARTS.items()}
    generators = list(AIGIQA20K_GENERATORS)
    scenes: Scenes = []
    rows: dict[str, list[tuple[str, float]]] = {part: [] for part in parts}
    first: dict[str, int] = {}  # part → its first scene
    for part, n in parts.items():
        first[part] = len(scenes)
        for size in _counts(n, math.ceil(n / AIGIQA20K_PER_PROMPT)):
            shots = []
            for choice in rng.choice(len(generators), size=size, replace=False):
                usual, image_size = AIGIQA20K_GENERATORS[generators[choice]]
                level = _level(usual, rng)
                name = f"{generators[choice]}_{sum(map(len, rows.values())):04d}.png"
                shots.append(_Shot(f"{part}/{name}", image_size, level, False))
                rows[part].append((name, round(_quality(level, rng), 4)))
            scenes.append(tuple(shots))

    def write_tables(root: Path, prompts: list[str]) -> None:
        for part, listed in rows.items():
            labelled = part == "train" or not withhold_labels
            part_prompts = _per_image(prompts[first[part] :], scenes[first[part] :])
            with open(root / f"info_{part}.csv", "w", newline="", encoding="utf-8") as table:
                writer = csv.writer(table, lineterminator="\n")
                writer.writerow(["name", "prompt", "mos"] if labelled else ["name", "prompt"])
                for (name, mos), prompt in zip(listed, part_prompts):
                    writer.writerow([name, prompt, f"{mos:.4f}"] if labelled else [name, prompt])

    return _Release(scenes, write_tables)


def _plan_evalmi50k(rng: np.random.Generator, scale: float, withhold_labels: bool) -> _Release:
    """EvalMi-50K: each prompt drawn by all 24 generators as <model>/<NNN>.png (NNN from 001, the prompt's row in
    question.xlsx) in the root; MOS&QA/AIGI2025_MOS_yn.xlsx (ImageName, MOS1 perception, MOS2 correspondence, the
    yes/no answers) and MOS&QA/question.xlsx (prompt, question_1..question_5)."""
    # 10 prompts: prompt-disjoint splits validate on 1 and test on 2.
    n_prompts = _scaled(EVALMI50K_PROMPTS, scale, 10)
    scenes: Scenes = []
    rows = []  # ImageName, MOS1, MOS2, Y/N
    for prompt in range(n_prompts):
        shots = []
        for model, (usual, side) in EVALMI50K_MODELS.items():
            level = _level(usual, rng)
            misdrawn = bool(rng.random() < MISALIGNED_SHARE)
            name = f"{model}/{prompt + 1:03d}.png"
            shots.append(_Shot(name, (side, side), level, misdrawn))
            # Rescaled z-scores around 50, as the release's (which lie in about 16-73).
            perception, correspondence = (
                50 + 10 * (v - 2.6) for v in (_quality(level, rng), _alignment(level, misdrawn, rng))
            )
            rows.append((name, round(perception, 4), round(correspondence, 4), int(not misdrawn)))
        scenes.append(tuple(shots))

    def write_tables(root: Path, prompts: list[str]) -> None:
        labels = pd.DataFrame(rows, columns=["ImageName", "MOS1", "MOS2", "Y/N"])
        for i in range(1, 5):
            labels[f"YN_{i}"] = None
        (root / "MOS&QA").mkdir(exist_ok=True)
        labels.to_excel(root / "MOS&QA" / "AIGI2025_MOS_yn.xlsx", index=False)
        questions = pd.DataFrame({"prompt": prompts})
        questions["question_1"] = [f"Does the image show {prompt}? Answer yes or no." for prompt in prompts]
        for i in range(2, 6):
            questions[f"question_{i}"] = None
        questions.to_excel(root / "MOS&QA" / "question.xlsx", index=False)

    return _Release(scenes, write_tables)


_PLANS: dict[str, Callable[[np.random.Generator, float, bool], _Release]] = {
    "agiqa-1k": _plan_agiqa1k,
    "agiqa-3k": _plan_agiqa3k,
    "aigciqa2023": _plan_aigciqa2023,
    "aigiqa-20k": _plan_aigiqa20k,
    "evalmi-50k": _plan_evalmi50k,
}


OPENAI_PATCHES = {"openai/clip-vit-base-patch32": 32, "openai/clip-vit-base-patch16": 16}
"""The hub ids the configs name, by the patch size of their image tower."""
VIT_B_VISION = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    image_size=224,
    hidden_act="quick_gelu",
    projection_dim=512,
)
"""The image tower of both (ViT-B), but for its patch size."""
VIT_B_TEXT = dict(
    hidden_size=512,
    intermediate_size=2048,
    num_attention_heads=8,
    num_hidden_layers=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=512,
)
"""The text tower of both, but for its vocabulary."""


def build_random_hub_cache(cache_dir: str | Path, *, seed: int = 0) -> Path:
    """Write random-weight CLIPs of the shapes of `OPENAI_PATCHES` as a Hugging Face hub cache; returns `cache_dir`.

    With ``HF_HUB_CACHE=cache_dir HF_HUB_OFFLINE=1``, ``from_pretrained("openai/clip-vit-base-patch32")`` then loads
    one (see `write_hub_snapshot`), so configs naming those ids run unchanged, offline: time and memory are the real
    models', scores mean nothing. The shapes are OpenAI's (`VIT_B_VISION` with patch 32 or 16, `VIT_B_TEXT`); the
    vocabulary is the byte-level tokenizer's 514 tokens instead of 49,408, which changes the size of one embedding
    table only. Both snapshots hold about 480 MB of float32 weights each.

    Args:
        cache_dir: the hub cache folder (what ``HF_HUB_CACHE`` names); created if needed.
        seed: seed of the patch-32 weights; the patch-16 weights use ``seed + 1``.
    """
    cache_dir = Path(cache_dir)
    for offset, (repo_id, patch_size) in enumerate(OPENAI_PATCHES.items()):
        write_hub_snapshot(cache_dir, repo_id, VIT_B_TEXT, dict(VIT_B_VISION, patch_size=patch_size), seed + offset)
    return cache_dir


def write_hub_snapshot(cache_dir: str | Path, repo_id: str, text: dict, vision: dict, seed: int) -> Path:
    """A random CLIP of the given tower configs (`CLIPTextConfig` and `CLIPVisionConfig` fields) as `repo_id` in a
    Hugging Face hub cache; returns its snapshot folder.

    The repository gets ``snapshots/<commit>/`` (config, float32 safetensors, the tokenizer of `write_byte_tokenizer`,
    CLIP's preprocessor config) and ``refs/main`` naming the commit, the layout the hub's offline mode reads. The
    commit is a hash of the configs and the seed: the same arguments give the same commit (and so the same feature
    cache namespaces), and a complete snapshot is reused. The snapshot is written to a temporary folder and renamed
    into place, so an interrupted build is redone, never read.
    """
    spec = json.dumps({"text": text, "vision": vision, "seed": seed}, sort_keys=True)
    commit = hashlib.sha1(spec.encode()).hexdigest()  # 40 hex digits, as the hub's commit ids
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    if not (snapshot / "model.safetensors").is_file():
        temporary = repo / f".tmp-{uuid.uuid4().hex}"
        _save_clip(temporary, text, vision, vision["projection_dim"], seed)
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temporary, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
