"""Image decoding and CLIP preprocessing, shared by training, the feature cache and scoring.

`ClipPreprocess` reproduces transformers' CLIP image processor on its PIL backend (the pipeline OpenAI's CLIP was
trained with) pixel for pixel. With torchvision installed, `CLIPImageProcessor` switches to a torch resize whose
pixels differ slightly; this module keeps the PIL pipeline either way, so cached features do not depend on what else
is installed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from mst_clipiqa.errors import BadImageError

if TYPE_CHECKING:
    import datasets

DRAFT_MIN_SIDE = 224
"""Short side below which draft decoding never goes, so the resize to 224 never upsamples a draft."""

_WHITE = (255, 255, 255, 255)
_REQUIRED_STEPS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")


def _openai_clip(statistic: str) -> tuple[float, float, float]:
    """OpenAI CLIP's per-channel "MEAN" or "STD", from transformers (imported here: it takes seconds to import)."""
    from transformers import image_utils

    return tuple(getattr(image_utils, f"OPENAI_CLIP_{statistic}"))


def open_image(source: Any, *, draft: bool = False) -> Image.Image:
    """Decode an image fully and convert it to RGB (see `to_rgb`), honouring its EXIF orientation; a
    `BadImageError` names a file that is missing, unreadable, truncated or a decompression bomb.

    `source` is a path, raw bytes, a `datasets` Image dict ({"path", "bytes"}), or a PIL image, taken as its owner
    oriented it (and returned as is when RGB). `draft` lets Pillow decode JPEGs at a reduced scale (1/2, 1/4 or
    1/8), never below 224 on the short side: faster for large JPEGs, with pixels slightly different from a full
    decode.
    """
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<PIL image>"
        with _decode_errors(name):
            source.load()  # a lazily opened file fails here, inside the guard, rather than later
            return to_rgb(source)
    name, data = _describe(source)
    with _decode_errors(name), Image.open(io.BytesIO(data) if data is not None else name) as image:
        _check_pixel_count(image, name)
        if draft and image.format == "JPEG":
            image.draft(None, _draft_size(image.size))
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way CLIP's processor does, with proper 16-bit and float handling.

    Transparency (an alpha band, a palette alpha or a `transparency` colour) is composited onto white, as
    transformers' `convert_to_rgb` does. Modes Pillow would clip are scaled instead: I;16 maps 0..65535 onto
    0..255; mode I, which carries no bit depth, is read as 16-bit when a value exceeds 255 and as 8-bit otherwise;
    mode F is read as fractions when every value lies in [0, 1] and as 0..255 otherwise.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _wide_to_8bit(image)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, _WHITE), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIP's image preprocessing: shortest-edge resize, centre crop, rescale and normalise, as one callable.
    Identical to transformers' CLIP image processor (PIL backend) on every image, and faster, as rescale plus
    normalise become one 256-entry lookup per channel (perf/preprocess_speed.py)."""

    shortest_edge: int = 224
    """Length the shorter side is resized to; the longer side keeps the aspect ratio, truncated to an integer."""
    crop_size: tuple[int, int] = (224, 224)
    """(height, width) of the centre crop; a smaller resized image is zero-padded, as transformers does."""
    image_mean: tuple[float, float, float] = field(default_factory=lambda: _openai_clip("MEAN"))
    """Per-channel mean subtracted after rescaling (OpenAI CLIP's, as transformers holds it, by default)."""
    image_std: tuple[float, float, float] = field(default_factory=lambda: _openai_clip("STD"))
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    """Pillow resampling filter of the resize (3 = bicubic)."""
    _lut: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # transformers rescales in float64, casts to float32, then normalises in float32: tabulating exactly that
        # arithmetic for the 256 possible values keeps the output bit-identical.
        scaled = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None]
        object.__setattr__(self, "_lut", (scaled[None, :] - mean) / std)  # (3, 256)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> ClipPreprocess:
        """Read the preprocessing of a CLIP checkpoint (a hub id or a folder; its `preprocessor_config.json`),
        `kwargs` passed to the lookup (`revision`, `local_files_only`, ...). A ValueError says when it asks for a step
        this class does not perform (no resize, square resize, ...)."""
        from transformers.image_processing_base import ImageProcessingMixin

        config, _ = ImageProcessingMixin.get_image_processor_dict(str(name_or_path), **kwargs)
        skipped = [step for step in _REQUIRED_STEPS if not config.get(step, True)]
        size, crop = config.get("size", 224), config.get("crop_size", 224)
        if isinstance(size, dict):
            keys = {key for key, value in size.items() if value is not None}
            size = size["shortest_edge"] if keys == {"shortest_edge"} else None
        if skipped or not isinstance(size, int):
            raise ValueError(
                f"{name_or_path}: unsupported preprocessing (size={config.get('size')}, disabled steps={skipped}); "
                "ClipPreprocess performs CLIP's shortest-edge resize, centre crop, rescale and normalisation"
            )
        crop_size = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        return cls(
            shortest_edge=size,
            crop_size=crop_size,
            image_mean=tuple(config.get("image_mean") or _openai_clip("MEAN")),
            image_std=tuple(config.get("image_std") or _openai_clip("STD")),
            rescale_factor=config.get("rescale_factor", 1 / 255),
            resample=config.get("resample", Image.Resampling.BICUBIC),
        )

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize: the short side to `shortest_edge`, the long one truncated, not rounded."""
        if width <= height:
            return self.shortest_edge, int(self.shortest_edge * height / width)
        return int(self.shortest_edge * width / height), self.shortest_edge

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Preprocess one image of any mode into `pixel_values` of shape (3, crop height, crop width), float32."""
        if image.mode != "RGB":
            image = to_rgb(image)
        new_width, new_height = self.resized_size(*image.size)
        crop_h, crop_w = self.crop_size
        top, left = (new_height - crop_h) // 2, (new_width - crop_w) // 2
        # Pillow fills a crop box reaching outside the image with zeros, at the offsets transformers' padding uses.
        resized = image.resize((new_width, new_height), self.resample).crop((left, top, left + crop_w, top + crop_h))
        pixels = np.asarray(resized)  # (H, W, 3) uint8
        out = np.empty((3, crop_h, crop_w), dtype=np.float32)
        for channel in range(3):
            np.take(self._lut[channel], pixels[..., channel], out=out[channel])
        return torch.from_numpy(out)  # (3, H, W)


def load_pixels(source: Any, preprocess: ClipPreprocess, *, draft: bool = False) -> torch.Tensor:
    """Decode one image (`open_image`) and preprocess it: the (3, 224, 224) tensor both CLIP streams read."""
    return preprocess(open_image(source, draft=draft))


class ImageRows(Dataset):
    """Rows of a unified table (`schema.FEATURES`) → {"pixel_values", "prompt", "mos", "index"}, decoded and
    preprocessed where the loader's workers run; ``index`` is the row in the table. The one pixel dataset: training
    and evaluation read it, the feature cache encodes from it, `score` scores it. ``mos`` comes from `mos_column`
    (NaN where a row has none; no ``mos`` for None).

    With `keep_errors`, an image that cannot be read becomes its item's ``error`` (zeros for its pixels) instead of
    raising its `BadImageError`, so one bad file never stops a scoring job; every item then has an ``error``, "" where
    the image was read.
    """

    def __init__(
        self,
        table: datasets.Dataset,
        rows: list[int],
        mos_column: str | None,
        preprocess: ClipPreprocess,
        draft: bool = False,
        keep_errors: bool = False,
    ):
        # Only the columns read: a row of the whole table costs twice as long to fetch.
        self.table = table.select_columns(["image", "prompt", *([mos_column] if mos_column else [])])
        self.rows, self.column = list(rows), mos_column
        self.preprocess, self.draft, self.keep_errors = preprocess, draft, keep_errors

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row, error = self.table[self.rows[i]], ""
        try:
            pixels = load_pixels(row["image"], self.preprocess, draft=self.draft)  # (3, 224, 224)
        except BadImageError as err:
            if not self.keep_errors:
                raise
            pixels, error = torch.zeros(3, *self.preprocess.crop_size), str(err)
        item = {"pixel_values": pixels, "prompt": row["prompt"] or "", "index": self.rows[i]}
        if self.column is not None:
            mos = row[self.column]
            item["mos"] = torch.tensor(np.nan if mos is None else mos, dtype=torch.float32)
        if self.keep_errors:
            item["error"] = error
        return item


@contextmanager
def _decode_errors(name: str) -> Iterator[None]:
    """Turn Pillow's decoding failures into BadImageError naming the file."""
    try:
        yield
    except FileNotFoundError as err:
        raise BadImageError(f"image file not found: {name}") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImageError(f"image is too large (decompression bomb guard): {name}: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, BadImageError):
            raise
        raise BadImageError(f"cannot decode image {name}: {err}") from err


def _check_pixel_count(image: Image.Image, name: str) -> None:
    """Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; a warnings filter would be process-wide and not
    thread-safe, so the limit is checked here, before any pixel is decoded."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise BadImageError(
            f"image is too large (decompression bomb guard): {name}: {image.width}x{image.height} pixels "
            f"exceeds the limit of {limit}"
        )


def _describe(source: Any) -> tuple[str, bytes | None]:
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            return str(source.get("path") or "<bytes>"), source["bytes"]
        source = source.get("path")
    if isinstance(source, bytes):
        return "<bytes>", source
    if isinstance(source, (str, os.PathLike)):
        return str(source), None
    raise BadImageError(f"not an image source: {type(source).__name__}")


def _draft_size(size: tuple[int, int], short_side: int = DRAFT_MIN_SIDE) -> tuple[int, int]:
    # Pillow picks the largest JPEG scale whose output still covers the requested size in both dimensions.
    scale = short_side / min(size)
    return max(short_side, round(size[0] * scale)), max(short_side, round(size[1] * scale))


def _wide_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey images to L (or LA when a transparent grey value is set)."""
    values = np.asarray(image)
    if image.mode == "F":
        values = np.nan_to_num(values)
        fractions = values.size > 0 and values.min() >= 0.0 and values.max() <= 1.0
        grey = np.clip(np.round(values * 255.0 if fractions else values), 0, 255)
    elif image.mode.startswith("I;16") or (values.size > 0 and values.max() > 255):
        grey = np.round(np.clip(values, 0, 65535) / 257.0)
    else:
        grey = np.clip(values, 0, 255)
    out = Image.fromarray(grey.astype(np.uint8))
    transparency = image.info.get("transparency")
    if isinstance(transparency, (int, float)):
        alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
        out = Image.merge("LA", (out, Image.fromarray(alpha)))
    return out
