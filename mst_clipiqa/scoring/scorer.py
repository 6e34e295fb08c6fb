"""Scores for people who just want scores: `load_scorer`/`Scorer` in Python (images in memory, decoded in a thread
pool one batch ahead of the model), and `score_files`, the engine of `mst-clipiqa score`: `Trainer.predict` over the
inputs as a table, on any number of devices, its rows streamed to disk by `PredictionWriter` and resumable.
"""

from __future__ import annotations

import errno
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator as CPU
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from mst_clipiqa.data.cells import assemble
from mst_clipiqa.data.checks import require_prompts
from mst_clipiqa.data.datamodule import prepare_features, rows_loader
from mst_clipiqa.data.features import FeatureRows, TableFeatures, tower_compute
from mst_clipiqa.data.preprocess import ClipPreprocess, ImageRows, load_pixels
from mst_clipiqa.data.schema import IMAGE_EXTENSIONS
from mst_clipiqa.data.tables import Columns, load_table
from mst_clipiqa.errors import BadImageError, BadRowError, WriteError
from mst_clipiqa.hub.pretrained import from_pretrained
from mst_clipiqa.model import CPU_BATCH, GPU_BATCH, MSTCLIPIQA, prefers_bf16
from mst_clipiqa.scoring.predictions import PredictionWriter, checked_path, done_rows, parts_folder
from mst_clipiqa.training.launch import check_world_size, take_launched_processes, take_launcher_options
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule

Precision = Literal["32", "bf16", "16"]
LIGHTNING_PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}
TABLE_EXTENSIONS = frozenset({".csv", ".tsv", ".jsonl", ".parquet", ".xlsx"})
LIST_EXTENSION = ".txt"

ImageInput = Image.Image | str | os.PathLike | bytes | Tensor
"""One image: a PIL image, a file path, encoded bytes, or a preprocessed (3, 224, 224) float tensor."""


class TrainedModelView:
    """What `Scorer` and `MSTCLIPIQAScore` tell of the trained network they score with (`_net`), and how both take
    prompts."""

    _net: MSTCLIPIQA

    @property
    def needs_prompt(self) -> bool:
        """True for the prompt head (variant B): every image needs its generation prompt."""
        return self._net.needs_prompt

    @property
    def mos_range(self) -> tuple[float, float]:
        """(low, high) of the MOS scale scores are reported on."""
        low, high = self._net.mos_range.tolist()
        return low, high

    def _head_prompts(self, items: Sequence[Any], prompts: Any, stacklevel: int, **how: Any) -> list[str] | None:
        """None for the template head, which reads none (warning at `stacklevel` if given); else `checked_prompts`."""
        if not self.needs_prompt:
            if prompts is not None:
                warnings.warn(
                    "the template head (variant A) does not read prompts; they are ignored", stacklevel=stacklevel
                )
            return None
        return checked_prompts(items, prompts, **how)


class Scorer(TrainedModelView):
    """A trained model, ready to score images on the MOS scale of the data it was trained on.

    Args:
        module: the trained model (from `from_pretrained` or a checkpoint).
        device: "cuda", "cpu", ...; None takes the GPU when there is one.
        precision: "32", "bf16" or "16" (autocast); None takes bf16 on a GPU that supports it, else 32.
        num_workers: threads decoding images; None picks from the CPU count.
        compile: compile the two image towers (`TwoStreamEncoder.compile_towers`): a while before the first batch,
            then faster towers; it pays when the towers, not decoding, set the pace (docs/PERFORMANCE.md).
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
        if precision not in LIGHTNING_PRECISION:
            raise ValueError(f"unknown precision {precision!r}: choose 32, bf16 or 16")
        self.precision = precision
        self.module = module.to(self.device).eval()
        config = module.net_config
        self.preprocess = ClipPreprocess.from_pretrained(config.coarse_encoder, revision=config.revision)
        self.draft_decode = config.draft_decode
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)
        self.default_batch_size = CPU_BATCH if self.device.type == "cpu" else GPU_BATCH
        if compile:
            self.module.net.encoder.compile_towers()

    @property
    def _net(self) -> MSTCLIPIQA:
        return self.module.net

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
        if prompts is not None:  # any value but None is a prompt, as its string
            prompts = [None if prompt is None else str(prompt) for prompt in prompts]
        rows = self.scores_and_shares(items, self._head_prompts(items, prompts, stacklevel=3), batch_size, skip_bad)
        return ((score, error) for score, _, error in rows)

    def scores_and_shares(
        self, items: list[ImageInput], prompts: list[str] | None, batch_size: int, skip_bad: bool
    ) -> Iterator[tuple[float | None, float | None, str | None]]:
        """(score, coarse share, error) per image, in order; the server scores its batches through this too."""
        for start, pixels in self._decoded(items, batch_size, self._decoders):
            bad = [p for p in pixels if isinstance(p, BadImageError)]
            if bad and not skip_bad:
                raise bad[0]
            good = [i for i, p in enumerate(pixels) if isinstance(p, Tensor)]
            scores = shares = iter(())
            if good:
                batch_prompts = [prompts[start + i] for i in good] if prompts is not None else None
                scored = self.score_pixels(torch.stack([pixels[i] for i in good]), batch_prompts)
                scores, shares = map(iter, scored)
            for p in pixels:
                yield (next(scores), next(shares), None) if isinstance(p, Tensor) else (None, None, str(p))

    @cached_property
    def _decoders(self) -> ThreadPoolExecutor:
        """The threads decoding images, started at the first call and kept: a server scores many small batches."""
        return ThreadPoolExecutor(self.num_workers, thread_name_prefix="mst-clipiqa-decode")

    def _decoded(
        self, items: list[ImageInput], batch_size: int, pool: ThreadPoolExecutor
    ) -> Iterator[tuple[int, list[Tensor | BadImageError]]]:
        """(start, decoded images) per batch; the next batch decodes while the caller scores this one."""

        def submit(start: int) -> list[Future]:
            return [
                pool.submit(pixels_or_error, item, self.preprocess, self.draft_decode)
                for item in items[start : start + batch_size]
            ]

        starts = range(0, len(items), batch_size)
        ahead = submit(0) if starts else []
        for k, start in enumerate(starts):
            current, ahead = ahead, submit(starts[k + 1]) if k + 1 < len(starts) else []
            yield start, [future.result() for future in current]

    def score_pixels(self, pixel_values: Tensor, prompts: list[str] | None) -> tuple[list[float], list[float]]:
        """The scores on the MOS scale and the gate's coarse shares of a (B, 3, 224, 224) batch, with the prompt
        head's B prompts: the trained module's predict step, as `score_files` runs it."""
        batch: dict[str, Any] = {
            "index": torch.arange(len(pixel_values)),
            "pixel_values": pixel_values.to(self.device, non_blocking=True),
        }
        if prompts is not None:
            batch["prompt"] = prompts
        _, autocast = tower_compute(self.device, LIGHTNING_PRECISION[self.precision])
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
    """The (3, 224, 224) tensor of one image, or why it cannot be read; a tensor that is not a preprocessed image is
    the calling code's mistake, a ValueError."""
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


def checked_prompts(
    items: Sequence[Any],
    prompts: Sequence[str | None] | None,
    name: Callable[[int], str] | None = None,
    ask: str = "pass one prompt per image",
) -> list[str]:
    """The prompt head's prompts, one non-blank string per image, else a BadRowError naming the image by `name(row)`
    (or asking to `ask` when there are none); a ValueError when the counts differ."""
    if prompts is None:
        raise BadRowError(
            f"this model's prompt head (variant B) scores each image against its generation prompt: {ask}"
        )
    prompts = list(prompts)
    if len(prompts) != len(items):
        raise ValueError(f"{len(items)} images but {len(prompts)} prompts")
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            image = name(row) if name else f"{_describe(items[row])} (row {row + 1} of {len(items)})"
            raise BadRowError(
                f"no prompt for {image}: the prompt head (variant B) needs the generation prompt of every image"
            )
    return prompts


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
) -> datasets.Dataset:
    """The command's INPUTs as one table of every image, in order (`schema.FEATURES`).

    A folder gives its images (recursively, sorted); a .txt file one path per line (blank lines and # comments
    skipped); a table its `image_column` and, given `prompt_column`, its prompts. Relative paths in lists and tables
    are relative to `image_root`, by default the list's or table's folder. Anything else is an image path.
    """
    parts: list[datasets.Dataset] = []
    for given in inputs:
        path = Path(given)
        suffix = path.suffix.lower()
        if suffix in TABLE_EXTENSIONS and not path.is_dir():
            columns = Columns(
                image_column=image_column,
                mos_columns={},
                prompt_column=prompt_column,
                image_root=str(image_root) if image_root is not None else None,
            )
            parts.append(load_table(path, columns))
            continue
        if path.is_dir():
            names = [str(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
            files = names
        elif suffix == LIST_EXTENSION:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            names = [line for line in lines if line and not line.startswith("#")]
            folder = Path(image_root) if image_root is not None else path.parent
            files = [str(folder / name) for name in names]
        else:
            names = files = [given]
        parts.append(assemble("score", given, names, [{"path": file, "bytes": None} for file in files]))
    return datasets.concatenate_datasets(parts or [assemble("score", "", [], [])])


class ScoreData(L.LightningDataModule):
    """The input rows of `score_files` for `Trainer.predict` (pixels through `ImageRows`, or embeddings through the
    feature cache), with what `PredictionWriter` writes of each row. An image that cannot be read keeps its reason
    (``error``) and gets no score, so one bad file never stops a job; `resume_from` leaves out the rows its shards
    hold."""

    def __init__(
        self,
        table: datasets.Dataset,
        preprocess: ClipPreprocess,
        draft: bool,
        needs_prompt: bool,
        batch_size: int,
        num_workers: int,
        resume_from: Path | None = None,
        features: TableFeatures | None = None,
    ):
        super().__init__()
        self.table, self.preprocess, self.draft, self.needs_prompt = table, preprocess, draft, needs_prompt
        self.batch_size, self.num_workers, self.resume_from = batch_size, num_workers, resume_from
        self.features = features
        self.todo = len(table)  # rows left to score, over all ranks

    @property
    def prediction_columns(self) -> tuple[str, ...]:
        return "image", *(("prompt",) if self.needs_prompt else ()), "score", "error"

    def describe_rows(self, index: Sequence[int]) -> list[dict[str, Any]]:
        rows = self.table.select_columns(["name", "prompt"])[list(index)]
        return [{"image": name, "prompt": prompt} for name, prompt in zip(rows["name"], rows["prompt"])]

    def predict_dataloader(self) -> DataLoader:
        done = done_rows(self.resume_from) if self.resume_from is not None else set()
        # Every rank must read the same rows done before any rank starts writing more.
        self.trainer.strategy.barrier("scores-done-read")
        rows = [row for row in range(len(self.table)) if row not in done]
        self.todo = len(rows)
        if self.features is not None:
            bad = prepare_features(self.features, rows, self.trainer, progress=True)
            dataset = FeatureRows(self.features, rows, None, errors=bad)
        else:
            dataset = ImageRows(self.table, rows, None, self.preprocess, self.draft, keep_errors=True)
        return rows_loader(dataset, self.batch_size, self.trainer, self.num_workers)


class ScoreProgress(Callback):
    """Counts the rows this rank scored and failed; rank 0 shows a progress bar in images of all ranks."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None
        self.scored = self.failed = 0
        self.first_error: str | None = None  # named when no image could be scored

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._bar = tqdm(total=trainer.datamodule.todo, unit="img", dynamic_ncols=True)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        errors = [error for error in outputs["error"] if error is not None]
        self.failed += len(errors)
        self.scored += len(outputs["error"]) - len(errors)
        if self.first_error is None and errors:
            self.first_error = errors[0]
        if self._bar is not None:
            # The other ranks run batches of the same size in step.
            self._bar.update(min(len(outputs["index"]) * trainer.world_size, self._bar.total - self._bar.n))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()


def idle_cores(seconds: float = 0.2) -> float | None:
    """How many of this process's cores sat idle over the next `seconds`, from Linux's /proc/stat; None elsewhere."""
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
    """torch threads for each of `ranks` scoring processes on the CPU: the idle cores, shared, at least 1 and at most
    torch's default; None leaves torch's count (OMP_NUM_THREADS set, or no way to tell). Threads wait for each other
    at every operation, so one descheduled by another process stalls them all (docs/PERFORMANCE.md)."""
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
    """What `mst-clipiqa score` runs (its options: `cli.commands.score`): `Trainer.predict` of the model over the
    images of `inputs`, into `out`, one row per image in input order. Returns, on every rank, the counts ``scored``,
    ``failed``, ``cached`` (read from the feature cache), ``done_before`` (found done by a resumed run) and
    ``images_per_s``; raises BadImageError when not one image could be scored (the file is written all the same)."""
    out = checked_path(out)
    module = from_pretrained(model, revision=revision)
    needs_prompt = module.net.needs_prompt
    table = collect_inputs(inputs, image_column, prompt_column if needs_prompt else None, image_root)
    if not len(table):
        raise FileNotFoundError(f"no images in {', '.join(map(str, inputs))}")
    if needs_prompt:
        prompts = table["prompt"][:]
        require_prompts(prompts, ", ".join(map(str, inputs)))
        checked_prompts([image["path"] for image in table["image"][:]], prompts)
    if resume and out.is_file() and not parts_folder(out).exists():
        print(f"nothing to resume: {out} was completed, every image is in it", file=sys.stderr)
        return {"scored": 0, "failed": 0, "cached": 0, "done_before": len(table), "images_per_s": 0.0}
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
        callbacks=[writer, progress := ScoreProgress()],
        default_root_dir=out.parent,
    )
    check_world_size(trainer.num_devices, trainer.num_nodes, None, prefix="--", job="a scoring job")
    on_cpu = isinstance(trainer.accelerator, CPU)
    config = module.net_config
    if num_workers is None:
        # On a CPU a second decoding process takes cores from the towers (docs/PERFORMANCE.md).
        num_workers = 1 if on_cpu else min(8, max(1, (os.cpu_count() or 1) // trainer.num_devices))
    batch_size = batch_size or (CPU_BATCH if on_cpu else GPU_BATCH)
    preprocess = ClipPreprocess.from_pretrained(config.coarse_encoder, revision=config.revision)
    cache = None
    if features:
        cache = TableFeatures(
            table,
            preprocess,
            draft_decode=config.draft_decode,
            cache_dir=cache_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            precision=options["precision"],
            in_memory=False,
        )
    data = ScoreData(
        table,
        preprocess,
        config.draft_decode,
        needs_prompt,
        batch_size,
        num_workers,
        resume_from=out if resume else None,
        features=cache,
    )
    if compile:
        module.net.encoder.compile_towers()
    threads = cpu_threads(trainer.num_devices) if on_cpu else None
    kept = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        trainer.predict(module, datamodule=data, return_predictions=False)
        writer.finish(trainer)  # a rank left without rows skipped the loop; the others wait for it here
    except WriteError as err:
        if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise WriteError(f"{err}; once there is room, run the same command with --resume true") from err
        raise
    finally:
        if threads is not None:
            torch.set_num_threads(kept)
    seconds = time.perf_counter() - started
    counts = trainer.strategy.reduce(
        torch.tensor([progress.scored, progress.failed], dtype=torch.float64), reduce_op="sum"
    )
    scored, failed = (int(count) for count in counts.tolist())
    cached = cache.stats.images_cached if cache is not None else 0  # the same on every rank
    report = {
        "scored": scored,
        "failed": failed,
        "cached": cached,
        "done_before": len(table) - data.todo,
        "images_per_s": (scored + failed) / seconds,
    }
    if scored == 0 and failed > 0 and report["done_before"] == 0:
        first = f" The first: {progress.first_error}" if progress.first_error else ""
        raise BadImageError(f"no image could be scored: all {failed} failed; {out} names each reason.{first}")
    if trainer.is_global_zero:
        resumed = f" ({report['done_before']} done before)" if resume else ""
        print(
            f"scored {scored}{f' ({cached} from the feature cache)' if features else ''}, failed {failed}{resumed}, "
            f"{report['images_per_s']:.1f} images/s: {out}" + ("; see the error column" if failed else ""),
            file=sys.stderr,
        )
    return report
