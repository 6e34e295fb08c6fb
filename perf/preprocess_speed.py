"""Per-image speed of ClipPreprocess against transformers' CLIP image processor, on the CPU.

Two measurements per image size: preprocessing a decoded RGB image, and decoding a JPEG plus preprocessing it
(with and without draft decoding). Prints a markdown table; `--output FILE` also writes it, with the machine named.

    python perf/preprocess_speed.py [--repeats 50] [--output docs/preprocess_speed.md]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from mst_clipiqa.data.preprocess import ClipPreprocess, load_pixels, open_image

try:  # the PIL backend, which CLIPImageProcessor resolves to without torchvision
    from transformers import CLIPImageProcessorPil as Reference
except ImportError:
    from transformers import CLIPImageProcessor as Reference

SIZES = [(300, 280), (512, 512), (768, 1024), (1024, 1024), (2048, 1536)]


def _image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8))


def _milliseconds(step: Callable[[], object], repeats: int) -> float:
    """Median wall time of one call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as folder:
        config = {
            "size": {"shortest_edge": 224},
            "crop_size": {"height": 224, "width": 224},
            "resample": 3,
            "image_mean": list(OPENAI_CLIP_MEAN),
            "image_std": list(OPENAI_CLIP_STD),
        }
        (Path(folder) / "preprocessor_config.json").write_text(json.dumps(config))
        reference, ours = Reference.from_pretrained(folder), ClipPreprocess.from_pretrained(folder)

    def transformers_pixels(image: Image.Image) -> torch.Tensor:
        return reference(image, return_tensors="pt")["pixel_values"][0]

    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {platform.system()}, Python "
        f"{platform.python_version()}, torch threads 1; median of {args.repeats} runs, milliseconds per image.",
        "",
        "| image | transformers | ClipPreprocess | ratio | max abs diff "
        "| JPEG decode + transformers | decode + ClipPreprocess | decode (draft) + ClipPreprocess |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for width, height in SIZES:
        image = _image(width, height)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        jpeg = buffer.getvalue()
        difference = (ours(image) - transformers_pixels(image)).abs().max().item()
        slow = _milliseconds(lambda: transformers_pixels(image), args.repeats)
        fast = _milliseconds(lambda: ours(image), args.repeats)
        slow_decode = _milliseconds(lambda: transformers_pixels(open_image(jpeg)), args.repeats)
        fast_decode = _milliseconds(lambda: load_pixels(jpeg, ours), args.repeats)
        draft_decode = _milliseconds(lambda: load_pixels(jpeg, ours, draft=True), args.repeats)
        lines.append(
            f"| {width}x{height} | {slow:.2f} | {fast:.2f} | {slow / fast:.2f}x | {difference:.1e} "
            f"| {slow_decode:.2f} | {fast_decode:.2f} | {draft_decode:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.write_text(f"# Preprocessing speed\n\n{table}\n")


if __name__ == "__main__":
    main()
