"""Scores for people who just want scores: `load_scorer` in Python and `mst-clipiqa score` on the command line.

    scorer = load_scorer("path/to/model")               # a saved folder, a hub repo id or a Lightning .ckpt
    scorer.score(["a.png", "b.jpg"])                    # [3.71, 2.05]: on the MOS scale the model was trained on
    scorer.score(images, prompts=["a red cube", ...])   # the prompt head (variant B) needs each image's prompt

Each image is decoded and preprocessed once (CLIP preprocessing of the coarse encoder), and both streams read the
same tensor. On a GPU the encoders run under bf16 autocast by default; the template head always computes in float32.

`Scorer` is the in-memory API for small jobs: images in, scores out, decoding in a thread pool one batch ahead of
the model. `score_files` is the command's engine for collections of any size: `Trainer.predict` of the trained
module's predict step over a loader whose worker processes decode (`ImageRows`), on as many devices and nodes as
given, with `PredictionWriter` streaming each rank's rows to disk and merging them in input order; a killed job
resumes where its shards end.
"""

from __future__ import annotations

import errno
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.accelerators import CPUAccelerator as CPU
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mst_clipiqa.data.checks import require_prompts
from mst_clipiqa.data.features import ShardWriter, Shelf, compute_name, default_cache_dir, file_key, image_shelves
from mst_clipiqa.data.preprocess import ClipPreprocess, load_pixels
from mst_clipiqa.data.samplers import EvalDistributedSampler
from mst_clipiqa.data.schema import IMAGE_EXTENSIONS
from mst_clipiqa.data.tables import Columns, load_table
from mst_clipiqa.errors import BadImageError, BadRowError, WriteError
from mst_clipiqa.hub.pretrained import from_pretrained
from mst_clipiqa.model import CPU_BATCH, GPU_BATCH, prefers_bf16
from mst_clipiqa.scoring.predictions import PredictionWriter, checked_path, done_rows, parts_folder
from mst_clipiqa.training.launch import check_world_size, take_launched_processes, take_launcher_options
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule, restore_threads

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
            Compiling takes a while before the first batch and fuses the towers' elementwise work, which gains most
            on a GPU; it pays when the towers, not decoding, set the pace (docs/PERFORMANCE.md).
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
        # The towers' best batch on each (docs/PERFORMANCE.md).
        self.default_batch_size = CPU_BATCH if self.device.type == "cpu" else GPU_BATCH
        if compile:
            self.module.net.encoder.compile_towers()

    @property
    def needs_prompt(self) -> bool:
        """True for the prompt head (variant B): every image needs its generation prompt."""
        return self.module.net.needs_prompt

    @property
    def mos_range(self) -> tuple[float, float]:
        """(low, high) of the MOS scale scores are reported on."""
        low, high = self.module.net.mos_range.tolist()
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
        return checked_prompts(items, prompts)

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
                    scores = iter(self.score_pixels(torch.stack([pixels[i] for i in good]), batch_prompts)[0])
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
        return pixels_or_error(item, self.preprocess, self.draft_decode)

    def score_pixels(self, pixel_values: Tensor, prompts: list[str] | None) -> tuple[list[float], list[float]]:
        """The scores on the MOS scale and the gate's coarse shares of a (B, 3, 224, 224) batch of decoded images
        (`pixels_or_error`), with the prompt head's B prompts (`checked_prompts`): the trained module's predict step,
        as `score_files` runs it."""
        batch: dict[str, Any] = {
            "index": torch.arange(len(pixel_values)),
            "pixel_values": pixel_values.to(self.device, non_blocking=True),
        }
        if prompts is not None:
            batch["prompt"] = prompts
        dtype = AUTOCAST_DTYPES.get(self.precision)
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()
        with torch.inference_mode(), autocast:
            rows = self.module.predict_step(batch, 0)
        return rows["score"].tolist(), rows["coarse_share"].tolist()


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


def pixels_or_error(item: ImageInput, preprocess: ClipPreprocess, draft: bool) -> Tensor | BadImageError:
    """The (3, 224, 224) tensor of one image, or why it cannot be read.

    Raises:
        ValueError: a tensor that is not a preprocessed image: a mistake in the calling code, not a bad image.
    """
    if isinstance(item, Tensor):
        expected = (3, *preprocess.crop_size)
        if tuple(item.shape) != expected or not item.is_floating_point():
            raise ValueError(
                f"a tensor image must be preprocessed, floating point of shape {expected}; "
                f"got {item.dtype} of shape {tuple(item.shape)}"
            )
        return item
    try:
        return load_pixels(item, preprocess, draft=draft)
    except BadImageError as err:
        return err


def checked_prompts(items: Sequence[ImageInput], prompts: Sequence[str | None] | None) -> list[str]:
    """The prompt head's prompts, one per image, as strings.

    Raises:
        BadRowError: no prompts, or an image without one; the message names it and its row.
        ValueError: not one prompt per image.
    """
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


# ---- what `mst-clipiqa score` runs (its options: `cli.commands.score`) -----------------------------------


def collect_inputs(
    inputs: Sequence[str],
    image_column: str = "image",
    prompt_column: str | None = None,
    image_root: str | Path | None = None,
) -> tuple[list[str], list[Any], list[str | None]]:
    """Expand the command's INPUTs into (names as written, image sources, prompts) of every image, in order.

    A folder gives its images (by extension, recursively, sorted); a .txt file one path per line (blank lines and
    lines starting with # skipped); a table its `image_column` and, when `prompt_column` is given, its prompts.
    Relative paths in lists and tables are relative to `image_root`, by default the list's or table's folder.
    Anything else is an image path, checked when it is decoded. Only table rows carry prompts.
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
            columns = Columns(
                image_column=image_column,
                mos_columns={},
                prompt_column=prompt_column,
                image_root=str(image_root) if image_root is not None else None,
            )
            table = load_table(path, columns)
            rows = list(zip(table["name"][:], [image["path"] for image in table["image"][:]], table["prompt"][:]))
        elif suffix == LIST_EXTENSION:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            kept = [line for line in lines if line and not line.startswith("#")]
            folder = Path(image_root) if image_root is not None else path.parent
            rows = [(line, str(folder / line), None) for line in kept]
        else:
            rows = [(given, given, None)]
        for name, source, prompt in rows:
            names.append(name)
            sources.append(source)
            prompts.append(prompt)
    return names, sources, prompts


class ImageRows(Dataset):
    """The images of some input rows, decoded and preprocessed where the loader's worker processes run.

    Item i is ``(row, pixels or None, error or None, prompt)`` for input row ``rows[i]``: an image that cannot be
    read becomes its error, so one bad file never stops a job. A row in `held` (its embeddings are in the feature
    cache) is not decoded: its item has neither pixels nor error.
    """

    def __init__(
        self,
        rows: Sequence[int],
        sources: Sequence[Any],
        prompts: Sequence[str | None],
        preprocess: ClipPreprocess,
        draft: bool,
        held: frozenset[int] = frozenset(),
    ):
        self.rows, self.sources, self.prompts = list(rows), sources, prompts
        self.preprocess, self.draft, self.held = preprocess, draft, held

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str | None, str | None]:
        row = self.rows[i]
        if row in self.held:
            return row, None, None, self.prompts[row]
        pixels = pixels_or_error(self.sources[row], self.preprocess, self.draft)
        if isinstance(pixels, BadImageError):
            return row, None, str(pixels), self.prompts[row]
        return row, pixels, None, self.prompts[row]


def collate_rows(items: list[tuple[int, Tensor | None, str | None, str | None]]) -> dict[str, Any]:
    """A batch of `ImageRows` items: every row's index and error, which rows were decoded and which are held in the
    feature cache, the decoded rows' pixels, and the prompts of both (the good rows), in row order."""
    decoded = [item for item in items if item[1] is not None]
    return {
        "index": torch.tensor([item[0] for item in items]),
        "decoded": torch.tensor([item[1] is not None for item in items]),
        "held": torch.tensor([item[1] is None and item[2] is None for item in items]),
        "pixel_values": torch.stack([item[1] for item in decoded]) if decoded else None,
        "prompt": [item[3] for item in items if item[2] is None],
        "error": [item[2] for item in items],
    }


class CachedEmbeddings:
    """The feature cache as a scoring job uses it: the two image embeddings of the input files it already holds,
    read instead of decoding and encoding those files again, and the embeddings the job computes, stored for later
    jobs and fits.

    Files are keyed as the training data's (`mst_clipiqa.data.features.image_keys`: path, size and modification
    time) in the namespaces of the model's towers, preprocessing, draft decoding and compute precision, so a file
    encoded by a fit of this model on this kind of device is found here, and the other way round.

    Args:
        shelves: the towers' namespaces ("coarse", "fine"), from `image_shelves`.
        sources: every input row's file.
    """

    def __init__(self, shelves: dict[str, Shelf], sources: Sequence[Any]):
        self.shelves = shelves
        self.keys = [file_key(Path(source)) if isinstance(source, (str, os.PathLike)) else None for source in sources]
        self.held = frozenset(
            row for row, key in enumerate(self.keys) if all(key in shelf.index for shelf in shelves.values())
        )
        self.writers = {stream: ShardWriter(shelf) for stream, shelf in shelves.items()}
        self.read = 0
        """Rows this process read from the cache."""

    def get(self, rows: list[int]) -> tuple[Tensor, Tensor]:
        """The (n, D) coarse and fine embeddings of held rows."""
        self.read += len(rows)
        return tuple(
            torch.from_numpy(np.stack([self.shelves[stream].get(self.keys[row])[0] for row in rows]))
            for stream in ("coarse", "fine")
        )

    def add(self, rows: list[int], coarse_embeds: Tensor, fine_embeds: Tensor) -> None:
        """Store the embeddings a batch computed for these rows (those whose file has a key)."""
        keep = [i for i, row in enumerate(rows) if self.keys[row] is not None]
        if keep:
            keys = [self.keys[rows[i]] for i in keep]
            for stream, values in (("coarse", coarse_embeds), ("fine", fine_embeds)):
                self.writers[stream].add(keys, [row[None] for row in values[keep].cpu().numpy()])

    def close(self) -> None:
        """Write what is left to store."""
        for writer in self.writers.values():
            writer.close()


class ScoreData(L.LightningDataModule):
    """The input rows of `score_files` for `Trainer.predict`, with what `PredictionWriter` writes of each row.

    Args:
        names: each image as the user gave it (the file's image column).
        sources: what to decode for each row (a path).
        prompts: each row's prompt (the prompt head's), or None.
        preprocess: CLIP preprocessing of the coarse encoder.
        draft: decode JPEGs in Pillow's draft mode (the model's `draft_decode`).
        needs_prompt: the model has the prompt head: the file gets a prompt column.
        batch_size: images per forward pass.
        num_workers: loader processes decoding images, per rank.
        resume_from: leave out the rows the shards of this file already hold (`done_rows`); None scores all.
        cache: the feature cache's embeddings of the inputs; None decodes and encodes every image.
    """

    def __init__(
        self,
        names: Sequence[str],
        sources: Sequence[Any],
        prompts: Sequence[str | None],
        preprocess: ClipPreprocess,
        draft: bool,
        needs_prompt: bool,
        batch_size: int,
        num_workers: int,
        resume_from: Path | None = None,
        cache: CachedEmbeddings | None = None,
    ):
        super().__init__()
        self.cache = cache
        self.names, self.sources, self.prompts = names, sources, prompts
        self.preprocess, self.draft, self.needs_prompt = preprocess, draft, needs_prompt
        self.batch_size, self.num_workers, self.resume_from = batch_size, num_workers, resume_from
        self.todo = len(names)
        """Rows left to score, over all ranks: all of them unless resuming."""

    @property
    def prediction_columns(self) -> tuple[str, ...]:
        return "image", *(("prompt",) if self.needs_prompt else ()), "score", "error"

    def describe_rows(self, index: Sequence[int]) -> list[dict[str, Any]]:
        return [{"image": self.names[row], "prompt": self.prompts[row]} for row in index]

    def predict_dataloader(self) -> DataLoader:
        done = done_rows(self.resume_from) if self.resume_from is not None else set()
        # Every rank must read the same rows done before any rank starts writing more.
        self.trainer.strategy.barrier("scores-done-read")
        rows = [row for row in range(len(self.names)) if row not in done]
        self.todo = len(rows)
        held = self.cache.held if self.cache is not None else frozenset()
        dataset = ImageRows(rows, self.sources, self.prompts, self.preprocess, self.draft, held)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EvalDistributedSampler(dataset),  # each row on one rank, none repeated
            num_workers=self.num_workers,
            collate_fn=collate_rows,
            pin_memory=not isinstance(self.trainer.accelerator, CPU),
        )


class ScoreStep(L.LightningModule):
    """The trained module's predict step on the good rows of each `ScoreData` batch; the others keep their error.

    With the feature cache (`cache`), the towers encode only the decoded rows, whose embeddings it stores, and the
    held rows' embeddings come from it; the head scores both alike. Counts the rows it scored and failed, on this
    rank.
    """

    def __init__(self, module: MSTCLIPIQAModule, cache: CachedEmbeddings | None = None):
        super().__init__()
        self.module, self.cache = module, cache
        self.scored = self.failed = 0
        self.first_error: str | None = None
        """The first reason a row of this rank failed, to name when none could be scored."""

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        index, decoded, held = batch["index"], batch["decoded"], batch["held"]
        good = decoded | held
        scores: list[float | None] = [None] * len(index)
        positions = good.nonzero().flatten().tolist()
        if positions:
            rows = {"index": index[good], "prompt": batch["prompt"]}
            if self.cache is None:
                rows["pixel_values"] = batch["pixel_values"]
            else:
                rows["coarse_embeds"], rows["fine_embeds"] = self._embeddings(batch, good)
            for position, score in zip(positions, self.module.predict_step(rows, batch_idx)["score"].tolist()):
                scores[position] = score
        self.scored += len(positions)
        self.failed += len(index) - len(positions)
        if self.first_error is None:
            self.first_error = next((error for error in batch["error"] if error is not None), None)
        return {"index": index, "score": scores, "error": batch["error"]}

    def _embeddings(self, batch: dict[str, Any], good: Tensor) -> tuple[Tensor, Tensor]:
        """The (n, D) float32 coarse and fine embeddings of the good rows, in row order: the towers' for the decoded
        rows (stored in the cache), the cache's for the held ones."""
        index, decoded, held = batch["index"], batch["decoded"], batch["held"]
        parts = []
        if batch["pixel_values"] is not None:
            encoded = tuple(e.float() for e in self.module.net.encoder(batch["pixel_values"]))
            self.cache.add(index[decoded].tolist(), *encoded)
            parts.append((decoded[good], encoded))
        if held.any():
            parts.append((held[good], tuple(e.to(self.device) for e in self.cache.get(index[held].tolist()))))
        n, dim = int(good.sum()), parts[0][1][0].shape[1]
        coarse_embeds, fine_embeds = (torch.empty(n, dim, device=self.device) for _ in range(2))
        for where, (coarse, fine) in parts:
            where = where.to(self.device)
            coarse_embeds[where], fine_embeds[where] = coarse, fine
        return coarse_embeds, fine_embeds


class ImagesProgress(Callback):
    """A progress bar in images (all ranks' together) with images/s and the time left, on rank 0."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._bar = tqdm(total=trainer.datamodule.todo, unit="img", dynamic_ncols=True)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        if self._bar is not None:
            # The other ranks run batches of the same size in step.
            self._bar.update(min(len(outputs["index"]) * trainer.world_size, self._bar.total - self._bar.n))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()


LIGHTNING_PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


def idle_cores(seconds: float = 0.2) -> float | None:
    """How many of the cores this process may run on sat idle over the next `seconds`, from Linux's /proc/stat; None
    elsewhere."""
    mine = {f"cpu{core}" for core in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else set()

    def sample() -> tuple[int, int]:
        idle = total = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *ticks = line.split()
            if name in mine:
                user, nice, system, idle_ticks, iowait, irq, softirq, steal = map(int, ticks[:8])
                idle += idle_ticks + iowait
                total += user + nice + system + idle_ticks + iowait + irq + softirq + steal
        return idle, total

    try:
        idle, total = sample()
        time.sleep(seconds)
        idle_after, total_after = sample()
    except (OSError, ValueError):
        return None
    if total_after <= total:
        return None
    return (idle_after - idle) / (total_after - total) * len(mine)


def cpu_threads(ranks: int) -> int | None:
    """torch threads for each of `ranks` scoring processes on the CPU: the cores idle now, shared, at most torch's
    default and at least 1; None leaves torch's own count (OMP_NUM_THREADS set, or no way to tell).

    Each operation of the towers is split among the threads, which wait for each other at its end; when other
    processes hold the cores a thread is descheduled and the others wait for it, at every operation: on a loaded
    2-core machine two threads scored several times slower than one (docs/PERFORMANCE.md). On idle cores more threads
    are faster."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    idle = idle_cores()
    if idle is None:
        return None
    return max(1, min(torch.get_num_threads(), round(idle / ranks)))


def score_files(
    model: str | Path,
    inputs: Sequence[str],
    out: str | Path,
    *,
    image_column: str = "image",
    prompt_column: str | None = "prompt",
    image_root: str | Path | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    devices: int | str = 1,
    num_nodes: int = 1,
    accelerator: str = "auto",
    precision: Precision | None = None,
    resume: bool = False,
    revision: str | None = None,
    compile: bool = False,
    features: bool = False,
    cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """What `mst-clipiqa score` runs (see its options in `mst_clipiqa.cli.commands.score`): `Trainer.predict` of the
    model over the images of `inputs`, into `out`, one row per image in input order.

    Returns:
        On every rank: ``scored`` and ``failed`` (images, all ranks, this run), ``cached`` (of those scored, the
        images read from the feature cache), ``done_before`` (rows a resumed run found done) and ``images_per_s``.

    Raises:
        BadRowError: the prompt head and an image without a prompt; the message names it.
        BadImageError: not one image could be scored (the file is written, each reason in its error column).
        OptionError: the devices and nodes disagree with the processes a launcher started.
        FileNotFoundError: no images in `inputs`.
    """
    out = checked_path(out)
    module = from_pretrained(model, revision=revision)
    needs_prompt = module.net.needs_prompt
    names, sources, prompts = collect_inputs(inputs, image_column, prompt_column if needs_prompt else None, image_root)
    if not names:
        raise FileNotFoundError(f"no images in {', '.join(map(str, inputs))}")
    if needs_prompt:
        require_prompts(prompts, ", ".join(map(str, inputs)))
        checked_prompts(sources, prompts)
    if resume and out.is_file() and not parts_folder(out).exists():
        print(f"nothing to resume: {out} was completed, every image is in it", file=sys.stderr)
        return {"scored": 0, "failed": 0, "cached": 0, "done_before": len(names), "images_per_s": 0.0}
    options: dict[str, Any] = {
        "accelerator": accelerator,
        "strategy": "auto",
        "devices": devices,
        "num_nodes": num_nodes,
        "precision": precision,
    }
    defaults = {"accelerator": "auto", "devices": 1, "num_nodes": 1, "precision": None}
    take_launcher_options(options, defaults)
    take_launched_processes(options, defaults)
    precision = options["precision"]
    if precision is None:
        on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        precision = "bf16" if on_gpu and prefers_bf16(torch.device("cuda")) else "32"
    options["precision"] = LIGHTNING_PRECISION.get(precision, precision)
    writer = PredictionWriter(out, resume=resume)
    trainer = L.Trainer(
        **options,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer, ImagesProgress()],
        default_root_dir=out.parent,
    )
    check_world_size(trainer.num_devices, trainer.num_nodes, None, prefix="--", job="a scoring job")
    on_cpu = isinstance(trainer.accelerator, CPU)
    config = module.net_config
    if num_workers is None:
        # On a CPU the towers need every core: a second decoding process takes cores from them and slows scoring
        # more than it speeds decoding (docs/PERFORMANCE.md).
        num_workers = 1 if on_cpu else min(8, max(1, (os.cpu_count() or 1) // trainer.num_devices))
    preprocess = ClipPreprocess.from_pretrained(config.coarse_encoder, revision=config.revision)
    cache = None
    if features:
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        compute = compute_name(trainer.strategy.root_device, options["precision"])
        cache = CachedEmbeddings(image_shelves(root, module.net, preprocess, config.draft_decode, compute), sources)
    data = ScoreData(
        names,
        sources,
        prompts,
        preprocess,
        config.draft_decode,
        needs_prompt,
        batch_size or (CPU_BATCH if on_cpu else GPU_BATCH),
        num_workers,
        resume_from=out if resume else None,
        cache=cache,
    )
    if compile:
        module.net.encoder.compile_towers()
    step = ScoreStep(module, cache)
    threads = cpu_threads(trainer.num_devices) if on_cpu else None
    kept = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        trainer.predict(step, datamodule=data, return_predictions=False)
        if cache is not None:
            cache.close()
        writer.finish(trainer)  # a rank left without rows skipped the loop; the others wait for it here
    except WriteError as err:
        if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise WriteError(f"{err}; once there is room, run the same command with --resume true") from err
        raise
    finally:
        restore_threads(kept if threads is not None else None)
    seconds = time.perf_counter() - started
    read = cache.read if cache is not None else 0
    counts = trainer.strategy.reduce(
        torch.tensor([step.scored, step.failed, read], dtype=torch.float64), reduce_op="sum"
    )
    scored, failed, cached = (int(count) for count in counts.tolist())
    report = {
        "scored": scored,
        "failed": failed,
        "cached": cached,
        "done_before": len(names) - data.todo,
        "images_per_s": (scored + failed) / seconds,
    }
    if scored == 0 and failed > 0 and report["done_before"] == 0:
        first = f" The first: {step.first_error}" if step.first_error else ""
        raise BadImageError(f"no image could be scored: all {failed} failed; {out} names each reason.{first}")
    if trainer.is_global_zero:
        resumed = f" ({report['done_before']} done before)" if resume else ""
        print(
            f"scored {scored}{f' ({cached} from the feature cache)' if features else ''}, failed {failed}{resumed}, "
            f"{report['images_per_s']:.1f} images/s: {out}"
            + ("; see the error column" if failed else ""),
            file=sys.stderr,
        )
    return report
