"""The offline demo's data set, drawn procedurally in AGIQA-3K's layout.

Each scene is a few coloured shapes on a flat or gradient background, described in words by its prompt, and is
rendered at five distortion levels of one distortion (blur, noise, JPEG blocking, pixelation or colour banding).
Quality MOS falls with the level; alignment MOS is low for the scenes whose prompt names a wrong colour, shape or
relation. The labels are synthetic, so the demo exercises the pipeline end to end rather than measuring anything.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HEADER = ("name", "prompt", "adj1", "adj2", "style", "mos_quality", "std_quality", "mos_align", "std_align")
LEVELS = 5
MARKER = "demo_dataset.json"
FORMAT_VERSION = 1
"""Bump when the drawing changes, so that an existing folder is redrawn rather than reused."""

COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 200),
    "yellow": (240, 205, 40),
    "orange": (255, 127, 14),
    "purple": (148, 80, 189),
    "pink": (240, 130, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "stripes")
RELATIONS = {
    "above": "below",
    "below": "above",
    "to the left of": "to the right of",
    "to the right of": "to the left of",
}
DISTORTIONS = ("blur", "noise", "jpeg", "pixelate", "banding")
# Strength per level, level 0 undistorted: blur radius, noise sigma, JPEG quality, pixel block, levels per channel.
STRENGTH = {
    "blur": (0, 1.0, 2.0, 3.5, 5.5),
    "noise": (0, 10, 20, 32, 48),
    "jpeg": (0, 30, 14, 7, 3),
    "pixelate": (1, 3, 5, 8, 12),
    "banding": (256, 20, 10, 6, 3),
}
QUALITY_BY_LEVEL = (4.5, 3.6, 2.7, 1.8, 0.9)
ADJ1 = ("simple", "bright", "colourful", "clean")
ADJ2 = ("flat", "minimal", "geometric", "smooth")
STYLES = ("flat illustration", "vector art", "poster art", "abstract art")
MISALIGNED_SHARE = 0.2
PNG_SHARE = 0.2
SUPERSAMPLE = 2
_NAME = re.compile(r"demo\d_(normal|lowcorr)_\d{3,}\.(jpg|png)")


@dataclass(frozen=True)
class _Shape:
    kind: str
    colour: str
    cell: tuple[int, int]  # (row, column) in a 3x3 grid

    def words(self) -> str:
        if self.kind == "stripes":
            return f"{self.colour} stripes"
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.colour} {self.kind}"


@dataclass(frozen=True)
class _Scene:
    size: tuple[int, int]
    background: tuple[str, str | None]  # flat colour, or the two ends of a vertical gradient
    shapes: tuple[_Shape, ...]
    relation: str  # of shapes[0] to shapes[1]
    jitter: tuple[tuple[float, float, float], ...]  # per shape: x, y offsets and scale


def make_demo_dataset(root: str | Path, *, n_scenes: int = 40, seed: int = 0) -> Path:
    """Write the demo data set (n_scenes x 5 images) to `root`, or reuse it when it is already there.

    `root/data.csv` has AGIQA-3K's header and MOS on its 0-5 scale; images go to `root/images/`. The same
    arguments give byte-identical files. A marker file records the arguments, so a complete folder is reused and
    an incomplete or different one redrawn.

    Args:
        root: folder to write; created if needed.
        n_scenes: number of scenes, each drawn at 5 distortion levels.
        seed: seed of every random choice; scene i depends only on (seed, i).

    Raises:
        FileExistsError: `root` holds a data.csv that this function did not write (a real data set, say).
    """
    root = Path(root)
    marker = {"generator": "mst_clipiqa demo", "version": FORMAT_VERSION, "n_scenes": n_scenes, "seed": seed}
    if _complete(root, marker):
        return root
    if (root / "data.csv").exists() and not (root / MARKER).exists():
        raise FileExistsError(f"{root} already holds a data.csv that is not a demo data set; choose another folder")
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(json.dumps({**marker, "complete": False}))
    rows = []
    for index in range(n_scenes):
        rows += _write_scene(images, index, np.random.default_rng([seed, index]))
    # Images of an earlier, larger draw would linger beside the new table.
    written = {row[0] for row in rows}
    for path in images.iterdir():
        if _NAME.fullmatch(path.name) and path.name not in written:
            path.unlink()
    with open(root / "data.csv", "w", newline="", encoding="utf-8") as table:
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(rows)
    (root / MARKER).write_text(json.dumps({**marker, "complete": True}))
    return root


def _complete(root: Path, marker: dict) -> bool:
    try:
        if json.loads((root / MARKER).read_text()) != {**marker, "complete": True}:
            return False
        with open(root / "data.csv", newline="", encoding="utf-8") as table:
            names = [row["name"] for row in csv.DictReader(table)]
    except (OSError, ValueError, KeyError):
        return False
    return len(names) == marker["n_scenes"] * LEVELS and all((root / "images" / name).is_file() for name in names)


def _write_scene(images: Path, index: int, rng: np.random.Generator) -> list[list[str]]:
    scene = _draw_plan(rng)
    misaligned = rng.random() < MISALIGNED_SHARE
    prompt = _describe(_perturb(scene, rng) if misaligned else scene)
    adj1, adj2, style = (str(rng.choice(words)) for words in (ADJ1, ADJ2, STYLES))
    distortion = str(rng.choice(DISTORTIONS))
    suffix = ".png" if rng.random() < PNG_SHARE else ".jpg"
    clean = _render(scene)
    rows = []
    for level in range(LEVELS):
        name = f"demo{level}_{'lowcorr' if misaligned else 'normal'}_{index:03d}{suffix}"
        image = _distort(clean, distortion, level, rng)
        if suffix == ".png":
            image.save(images / name, format="PNG")
        else:
            image.save(images / name, format="JPEG", quality=95)
        quality = _quality(level, rng)
        align = _alignment(level, misaligned, rng)
        rows.append(
            [name, prompt, adj1, adj2, style]
            + [f"{value:.4f}" for value in (quality, rng.uniform(0.3, 0.7), align, rng.uniform(0.3, 0.7))]
        )
    return rows


def _quality(level: int, rng: np.random.Generator) -> float:
    """Quality MOS on a 0-5 scale: falls with the distortion level."""
    return _mos(QUALITY_BY_LEVEL[level] + rng.normal(0, 0.15))


def _alignment(level: int, misaligned: bool, rng: np.random.Generator) -> float:
    """Alignment MOS on a 0-5 scale: low where the image and its prompt disagree."""
    # Heavy distortion hides content too, so alignment drops a little with the level.
    return _mos((1.2 if misaligned else 4.1) - 0.1 * level + rng.normal(0, 0.2))


def _mos(value: float) -> float:
    """A drawn MOS kept inside the 0-5 scale."""
    return min(max(float(value), 0.05), 4.95)


def _draw_plan(rng: np.random.Generator) -> _Scene:
    names = list(COLOURS)
    order = rng.permutation(len(names))
    n_shapes = int(rng.integers(2, 4))
    shape_colours = [names[i] for i in order[:n_shapes]]
    background = names[order[n_shapes]]
    gradient = names[order[n_shapes + 1]] if rng.random() < 0.5 else None
    relation = str(rng.choice(list(RELATIONS)))
    line = int(rng.integers(0, 3))
    # The first two shapes sit at opposite ends of one row or column; a third takes the middle of the grid's other
    # axis, away from both.
    first, second = {
        "above": ((0, line), (2, line)),
        "below": ((2, line), (0, line)),
        "to the left of": ((line, 0), (line, 2)),
        "to the right of": ((line, 2), (line, 0)),
    }[relation]
    vertical = relation in ("above", "below")
    third = (1, (line + 1 + int(rng.integers(0, 2))) % 3) if vertical else ((line + 1 + int(rng.integers(0, 2))) % 3, 1)
    cells = (first, second, third)[:n_shapes]
    shapes = tuple(_Shape(str(rng.choice(SHAPES)), colour, cell) for colour, cell in zip(shape_colours, cells))
    jitter = tuple((rng.uniform(-0.12, 0.12), rng.uniform(-0.12, 0.12), rng.uniform(0.75, 1.0)) for _ in shapes)
    size = (int(rng.integers(256, 321)), int(rng.integers(256, 321)))
    return _Scene(size, (background, gradient), shapes, relation, jitter)


def _describe(scene: _Scene) -> str:
    first, second, *rest = scene.shapes
    text = f"{first.words()} {scene.relation} {second.words()}"
    if rest:
        text += f" and {rest[0].words()}"
    start, end = scene.background
    return text + (f" on a {start} background" if end is None else f" on a {start} to {end} gradient background")


def _perturb(scene: _Scene, rng: np.random.Generator) -> _Scene:
    """The same scene with one wrong detail in its description: a colour, a shape or the relation."""
    change = rng.choice(("colour", "shape", "relation"))
    if change == "relation":
        return _Scene(scene.size, scene.background, scene.shapes, RELATIONS[scene.relation], scene.jitter)
    target = int(rng.integers(0, 2))
    shape = scene.shapes[target]
    if change == "colour":
        used = {s.colour for s in scene.shapes} | set(scene.background)
        wrong = _Shape(shape.kind, str(rng.choice([c for c in COLOURS if c not in used])), shape.cell)
    else:
        wrong = _Shape(str(rng.choice([k for k in SHAPES if k != shape.kind])), shape.colour, shape.cell)
    shapes = scene.shapes[:target] + (wrong,) + scene.shapes[target + 1 :]
    return _Scene(scene.size, scene.background, shapes, scene.relation, scene.jitter)


def _render(scene: _Scene) -> Image.Image:
    # Drawn at twice the size and downsampled: Pillow's shapes have no antialiasing of their own.
    width, height = (side * SUPERSAMPLE for side in scene.size)
    start, end = scene.background
    top = np.asarray(COLOURS[start], dtype=np.float64)
    bottom = np.asarray(COLOURS[end or start], dtype=np.float64)
    y, x = np.mgrid[0:height, 0:width]
    ramp = (y / (height - 1))[..., None]  # (H, W, 1)
    # A flat background still gets soft diagonal lighting, so that banding and blocking have something to show.
    light = 1.0 if end else (1.08 - 0.16 * (x / width + y / height) / 2)[..., None]  # (H, W, 1)
    canvas = np.clip((top + (bottom - top) * ramp) * light, 0, 255)  # (H, W, 3)
    image = Image.fromarray(np.round(canvas).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cell_w, cell_h = width / 3, height / 3
    for shape, (dx, dy, scale) in zip(scene.shapes, scene.jitter):
        row, column = shape.cell
        cx, cy = (column + 0.5 + dx) * cell_w, (row + 0.5 + dy) * cell_h
        r = 0.42 * min(cell_w, cell_h) * scale
        colour = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif shape.kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif shape.kind == "triangle":
            draw.polygon(((cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)), fill=colour)
        else:
            bar = 2 * r / 7
            for k in range(0, 7, 2):
                draw.rectangle((cx - r + k * bar, cy - r, cx - r + (k + 1) * bar, cy + r), fill=colour)
    return image.resize(scene.size, Image.Resampling.LANCZOS)


def _distort(image: Image.Image, distortion: str, level: int, rng: np.random.Generator) -> Image.Image:
    strength = STRENGTH[distortion][level]
    if level == 0:
        return image
    if distortion == "blur":
        return image.filter(ImageFilter.GaussianBlur(strength))
    if distortion == "noise":
        noisy = np.asarray(image, dtype=np.float64) + rng.normal(0.0, strength, (image.height, image.width, 3))
        return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    if distortion == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=strength)
        return Image.open(buffer).convert("RGB")
    if distortion == "pixelate":
        small = image.resize((image.width // strength, image.height // strength), Image.Resampling.BOX)
        return small.resize(image.size, Image.Resampling.NEAREST)
    step = 256 / strength  # banding: `strength` levels per channel, each shown at its middle value
    banded = (np.floor(np.asarray(image) / step) + 0.5) * step
    return Image.fromarray(np.clip(np.round(banded), 0, 255).astype(np.uint8))
