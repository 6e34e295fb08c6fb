"""Scores for people who just want scores: `load_scorer` in Python and `mst-clipiqa score` on the command line.

    scorer = load_scorer("path/to/model")               # a saved folder, a hub repo id or a Lightning .ckpt
    scorer.score(["a.png", "b.jpg"])                    # [3.71, 2.05]: on the MOS scale the model was trained on
    scorer.score(images, prompts=["a red cube", ...])   # the prompt head (variant B) needs each image's prompt

Each image is decoded and preprocessed once (CLIP preprocessing of the coarse encoder), and both streams read the
same tensor. Decoding runs in a thread pool, one batch ahead of the model. On a GPU the encoders run under bf16
autocast by default; the template head always computes in float32.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from mst_clipiqa.data.benchmarks import IMAGE_EXTENSIONS, load_table
from mst_clipiqa.data.features import CPU_BATCH, prefers_bf16
from mst_clipiqa.data.preprocess import ClipPreprocess, load_pixels
from mst_clipiqa.errors import BadImageError, BadRowError
from mst_clipiqa.lit_module import MSTCLIPIQAModule
from mst_clipiqa.pretrained import from_pretrained

Precision = Literal["32", "bf16", "16"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}
TABLE_EXTENSIONS = frozenset({".csv", ".tsv", ".jsonl", ".parquet", ".xlsx"})
LIST_EXTENSION = ".txt"

ImageInput = Image.Image | str | os.PathLike | bytes | Tensor
"""One image: a PIL image, a file path, encoded bytes, or a preprocessed (3, 224, 224) float tensor."""


class Scorer:
    """A trained model, ready to score images on the MOS scale of the data it was trained on.

    Args:
        module: the trained model (from `from_pretrained` or a checkpoint).
        device: "cuda", "cpu", ...; None takes the GPU when there is one.
        precision: "32", "bf16" or "16" (autocast); None takes bf16 on a GPU that supports it, else 32.
        num_workers: threads decoding images; None picks from the CPU count.
        compile: compile the two image towers (`TwoStreamEncoder.compile_towers`) for the first batch's size.
            Seconds of compilation for faster towers: +47% on an H100, +0-14% on a 2-core CPU; it pays when the
            towers, not decoding, set the pace (docs/PERFORMANCE.md).
    """

    def __init__(
        self,
        module: MSTCLIPIQAModule,
        device: str | torch.device | None = None,
        precision: Precision | None = None,
        num_workers: int | None = None,
        compile: bool = False,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision is None:
            precision = "bf16" if prefers_bf16(self.device) else "32"
        if precision not in ("32", *AUTOCAST_DTYPES):
            raise ValueError(f"unknown precision {precision!r}: choose 32, bf16 or 16")
        self.precision = precision
        self.module = module.to(self.device).eval()
        config = module.net_config
        self.preprocess = ClipPreprocess.from_pretrained(config.coarse_encoder, revision=config.revision)
        self.draft_decode = config.draft_decode
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)
        self.default_batch_size = CPU_BATCH if self.device.type == "cpu" else 256  # fastest measured, PERFORMANCE.md
        if compile:
            self.module.net.encoder.compile_towers()

    @property
    def needs_prompt(self) -> bool:
        """True for the prompt head (variant B): every image needs its generation prompt."""
        return self.module.net.needs_prompt

    @property
    def mos_range(self) -> tuple[float, float]:
        """(low, high) of the MOS scale scores are reported on."""
        low, high = self.module.mos_range.tolist()
        return low, high

    def score(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> list[float]:
        """Quality scores of the images, in order, on the training data's MOS scale.

        Args:
            images: one image or a sequence of them (PIL images, paths, bytes, preprocessed (3, 224, 224) tensors),
                or a (B, 3, 224, 224) batch tensor.
            prompts: the generation prompt of each image; required by the prompt head (variant B), ignored (with a
                warning) by the template head.
            batch_size: images per forward pass; None takes `default_batch_size`.

        Raises:
            BadImageError: an image cannot be read; the message names it.
            BadRowError: the prompt head got an image without a prompt.
        """
        return [score for score, _ in self.iter_scores(images, prompts, batch_size)]

    def iter_scores(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: Sequence[str | None] | None = None,
        batch_size: int | None = None,
        skip_bad: bool = False,
    ) -> Iterator[tuple[float | None, str | None]]:
        """Like `score`, but one (score, error) pair at a time, as batches finish.

        Prompts are checked before anything is decoded. With `skip_bad`, an image that cannot be read yields
        (None, the reason) and the others are still scored; otherwise its `BadImageError` is raised.
        """
        items = _as_items(images)
        batch_size = batch_size or self.default_batch_size
        return self._scores(items, self._checked_prompts(items, prompts), batch_size, skip_bad)

    def _checked_prompts(self, items: list[ImageInput], prompts: Sequence[str | None] | None) -> list[str] | None:
        if not self.needs_prompt:
            if prompts is not None:
                warnings.warn("the template head (variant A) does not read prompts; they are ignored", stacklevel=3)
            return None
        if prompts is None:
            raise BadRowError(
                "this model's prompt head (variant B) scores each image against its generation prompt: "
                "pass one prompt per image"
            )
        prompts = list(prompts)
        if len(prompts) != len(items):
            raise ValueError(f"{len(items)} images but {len(prompts)} prompts")
        for row, prompt in enumerate(prompts):
            if prompt is None or not str(prompt).strip():
                raise BadRowError(
                    f"no prompt for {_describe(items[row])} (row {row + 1} of {len(items)}): the prompt head "
                    "(variant B) needs the generation prompt of every image"
                )
        return [str(prompt) for prompt in prompts]

    def _scores(
        self, items: list[ImageInput], prompts: list[str] | None, batch_size: int, skip_bad: bool
    ) -> Iterator[tuple[float | None, str | None]]:
        with ThreadPoolExecutor(self.num_workers) as pool:
            for start, pixels in self._decoded(items, batch_size, pool):
                bad = [p for p in pixels if isinstance(p, BadImageError)]
                if bad and not skip_bad:
                    raise bad[0]
                good = [i for i, p in enumerate(pixels) if isinstance(p, Tensor)]
                scores = iter(())
                if good:
                    batch_prompts = [prompts[start + i] for i in good] if prompts is not None else None
                    scores = iter(self._score_pixels(torch.stack([pixels[i] for i in good]), batch_prompts))
                for p in pixels:
                    yield (next(scores), None) if isinstance(p, Tensor) else (None, str(p))

    def _decoded(
        self, items: list[ImageInput], batch_size: int, pool: ThreadPoolExecutor
    ) -> Iterator[tuple[int, list[Tensor | BadImageError]]]:
        """(start, decoded images) per batch; the next batch decodes while the caller scores this one."""

        def submit(start: int) -> list[Future]:
            return [pool.submit(self._pixels_or_error, item) for item in items[start : start + batch_size]]

        starts = range(0, len(items), batch_size)
        ahead = submit(0) if starts else []
        for k, start in enumerate(starts):
            current, ahead = ahead, submit(starts[k + 1]) if k + 1 < len(starts) else []
            yield start, [future.result() for future in current]

    def _pixels_or_error(self, item: ImageInput) -> Tensor | BadImageError:
        if isinstance(item, Tensor):
            expected = (3, *self.preprocess.crop_size)
            if tuple(item.shape) != expected or not item.is_floating_point():
                raise ValueError(
                    f"a tensor image must be preprocessed, floating point of shape {expected}; "
                    f"got {item.dtype} of shape {tuple(item.shape)}"
                )
            return item
        try:
            return load_pixels(item, self.preprocess, draft=self.draft_decode)
        except BadImageError as err:
            return err

    def _score_pixels(self, pixel_values: Tensor, prompts: list[str] | None) -> list[float]:
        """pixel_values (B, 3, 224, 224) → B scores on the MOS scale."""
        batch: dict[str, Any] = {"pixel_values": pixel_values.to(self.device, non_blocking=True)}
        if prompts is not None:
            batch["prompt"] = prompts
        dtype = AUTOCAST_DTYPES.get(self.precision)
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()
        with torch.inference_mode(), autocast:
            return self.module.to_mos(self.module(batch)).tolist()


def load_scorer(
    path_or_hub_id: str | Path,
    device: str | torch.device | None = None,
    precision: Precision | None = None,
    *,
    revision: str | None = None,
    compile: bool = False,
) -> Scorer:
    """A `Scorer` for a saved model folder, a hub repo id (`revision`: branch, tag or commit) or a Lightning .ckpt.

    See `Scorer` for `device`, `precision` and `compile`.
    """
    module = from_pretrained(path_or_hub_id, revision=revision)
    return Scorer(module, device=device, precision=precision, compile=compile)


def _as_items(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(images, Tensor):
        if images.ndim == 3:
            return [images]
        if images.ndim == 4:
            return list(images.unbind(0))
        raise ValueError(f"expected a (3, H, W) image or a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
    if isinstance(images, (str, os.PathLike, bytes, Image.Image)):
        return [images]
    return list(images)


def _describe(item: ImageInput) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    return getattr(item, "filename", "") or f"<{type(item).__name__}>"


# ---- what `mst-clipiqa score` runs (its options: `mst_clipiqa.cli.score`) --------------------------------------------


def collect_inputs(
    inputs: Sequence[str], image_column: str = "image", prompt_column: str | None = None
) -> tuple[list[str], list[Any], list[str | None]]:
    """Expand the command's INPUTs into (names as written, image sources, prompts) of every image, in order.

    A folder gives its images (by extension, recursively, sorted); a .txt file one path per line (blank lines and
    lines starting with # skipped); a table its `image_column` and, when `prompt_column` is given, its prompts.
    Relative paths in lists and tables are relative to the list's or table's folder. Anything else is an image
    path, checked when it is decoded. Only table rows carry prompts.
    """
    names: list[str] = []
    sources: list[Any] = []
    prompts: list[str | None] = []
    for given in inputs:
        path = Path(given)
        suffix = path.suffix.lower()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            rows = [(str(p), str(p), None) for p in found]
        elif suffix in TABLE_EXTENSIONS:
            table = load_table(path, image_column=image_column, mos_columns={}, prompt_column=prompt_column)
            rows = list(zip(table["name"], [image["path"] for image in table["image"]], table["prompt"]))
        elif suffix == LIST_EXTENSION:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            kept = [line for line in lines if line and not line.startswith("#")]
            rows = [(line, str(path.parent / line), None) for line in kept]
        else:
            rows = [(given, given, None)]
        for name, source, prompt in rows:
            names.append(name)
            sources.append(source)
            prompts.append(prompt)
    return names, sources, prompts


def write_scores(
    scorer: Scorer,
    names: Sequence[str],
    sources: Sequence[Any],
    prompts: Sequence[str | None],
    out: Path,
    batch_size: int | None = None,
) -> None:
    """Score `sources` into `out`, .csv or .jsonl by its extension: one row per image, in order, with its name as
    given, its prompt (prompt head only), its score and, for an image that cannot be read, the reason instead.

    Prompts are checked before the file is opened; progress and a closing count go to stderr.

    Raises:
        BadRowError: the prompt head and an image without a prompt; the message names it.
    """
    results = scorer.iter_scores(sources, prompts if scorer.needs_prompt else None, batch_size, skip_bad=True)
    columns = ["image", *(["prompt"] if scorer.needs_prompt else []), "score", "error"]
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = 0
    with open(out, "w", newline="", encoding="utf-8") as stream, tqdm(total=len(names), unit="img") as progress:
        writer = csv.DictWriter(stream, columns) if out.suffix.lower() == ".csv" else None
        if writer is not None:
            writer.writeheader()
        for name, prompt, (score, error) in zip(names, prompts, results):
            row = {"image": name, "prompt": prompt, "score": score, "error": error}
            row = {column: row[column] for column in columns}
            if writer is not None:
                writer.writerow({k: "" if v is None else v for k, v in row.items()})
            else:
                stream.write(json.dumps(row, ensure_ascii=False) + "\n")
            failed += error is not None
            progress.update()
    print(f"scored {len(names) - failed} of {len(names)} images into {out}", file=sys.stderr)
    if failed:
        print(f"{failed} could not be read: see the error column", file=sys.stderr)
