"""Image decoding and CLIP preprocessing, shared by training, the feature cache and scoring."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from mst_clipiqa.errors import BadImageError


def open_image(source: Any, *, draft: bool = False) -> Image.Image:
    """Decode an image fully and convert it to RGB.

    Args:
        source: a path, raw bytes, a PIL image, or a `datasets` Image dict ({"path", "bytes"}).
        draft: let Pillow decode JPEGs at a reduced size (never below 224 on the short side).

    Raises:
        BadImageError: the file is missing, unreadable, truncated or a decompression bomb; the message names it.
    """
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    name, data = _describe(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data) if data is not None else name)
            if draft and image.format == "JPEG":
                image.draft("RGB", _draft_size(image.size))
            image.load()
    except FileNotFoundError as err:
        raise BadImageError(f"image file not found: {name}") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImageError(f"image is too large (decompression bomb guard): {name}: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"cannot decode image {name}: {err}") from err
    return image.convert("RGB")


def _describe(source: Any) -> tuple[str, bytes | None]:
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            return str(source.get("path") or "<bytes>"), source["bytes"]
        source = source.get("path")
    if isinstance(source, bytes):
        return "<bytes>", source
    if isinstance(source, (str, Path)):
        return str(source), None
    raise BadImageError(f"not an image source: {type(source).__name__}")


def _draft_size(size: tuple[int, int], short_side: int = 224) -> tuple[int, int]:
    scale = short_side / min(size)
    return max(short_side, round(size[0] * scale)), max(short_side, round(size[1] * scale))
