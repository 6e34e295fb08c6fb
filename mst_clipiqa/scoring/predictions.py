"""Prediction files: one row per scored image, in row order, however many processes scored them.

`PredictionWriter` has every rank append its rows to its own shard (JSON lines in ``<file>.parts/``, flushed per
batch), so memory stays flat; when the loop ends rank 0 merges the shards by row index into the file (CSV, JSON lines
or Parquet by extension). A killed loop leaves its shards, which a resumed one keeps and completes (`done_rows`).
Shards and file must be on a file system every rank sees.
"""

from __future__ import annotations

import csv
import heapq
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from io import TextIOWrapper
from itertools import chain, islice
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from mst_clipiqa.errors import OptionError, write_error
from mst_clipiqa.scoring import FORMATS
from mst_clipiqa.training.checkpoints import new_run_file, run_dir

DEFAULT_NAME = "predictions.csv"  # in the run's log folder
FLOAT_COLUMNS = frozenset({"score", "mos", "coarse_share"})  # float64 in Parquet; index int64, the rest strings
PARQUET_ROWS = 65_536  # per row group: the most the merge holds in memory at once


def checked_path(path: str | os.PathLike) -> Path:
    """`path` as a Path, if its extension names a known format; else an OptionError."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise OptionError(
            f"predictions_path {str(path)!r}: the extension picks the format; use one of {', '.join(FORMATS)}"
        )
    return path


class PredictionWriter(BasePredictionWriter):
    """Writes every prediction of `Trainer.predict` to `path`, in row order: by default predictions.csv in the run's
    own folder (``predictions-v1.csv`` ... beside an earlier run's). A row joins the module's outputs with the data
    module's ``describe_rows(index)``, in its ``prediction_columns``, where it has them. With `resume`, the shards an
    interrupted loop left are kept (the data must leave out their rows); otherwise they are removed first."""

    def __init__(self, path: str | os.PathLike | None = None, resume: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.path = None if path is None else checked_path(path)
        self.resume = resume
        self.written: Path | None = None  # the file the last prediction loop wrote
        self._out: Path | None = None
        self._shard: TextIOWrapper | None = None
        self._generation = 0

    # ---- every rank ----------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Here rather than at on_predict_start, which a rank with no rows to predict never reaches: the collectives
        # below must run on every rank.
        if stage != "predict":
            return
        self.written = None
        self._out = self.path or self._default_path(trainer)
        parts = parts_folder(self._out)
        generation = 0
        if trainer.is_global_zero:
            if not self.resume:
                shutil.rmtree(parts, ignore_errors=True)
            generation = max((_generation(shard) + 1 for shard in _shards(parts)), default=0)
        generation = trainer.strategy.broadcast(generation)
        self._generation = generation
        shard = parts / _shard_name(trainer.global_rank, generation)
        try:
            parts.mkdir(parents=True, exist_ok=True)
            self._shard = open(shard, "w", encoding="utf-8")
        except OSError as err:
            raise write_error(shard, err) from err

    @staticmethod
    def _default_path(trainer: L.Trainer) -> Path:
        # Every rank asks (run_dir is a broadcast); rank 0's answer holds, whatever another rank sees of the folder.
        path = new_run_file(trainer, run_dir(trainer), DEFAULT_NAME)
        return Path(trainer.strategy.broadcast(str(path)))

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        outputs = {key: v.tolist() if isinstance(v, Tensor) else list(v) for key, v in prediction.items()}
        index = outputs["index"]
        describe = getattr(trainer.datamodule, "describe_rows", None)
        described = describe(index) if describe is not None else [{} for _ in index]
        columns = self._declared_columns(trainer) or [key for key in prediction if key != "index"]
        rows = ({**about, **{key: values[i] for key, values in outputs.items()}} for i, about in enumerate(described))
        try:
            _write_jsonl(self._shard, rows, ["index", *columns])
            # To the OS at every batch: a killed loop's rows survive it, for a resumed one to skip.
            self._shard.flush()
        except OSError as err:  # full disk, file-size limit: what reached the shard stays, for a resumed loop
            raise write_error(self._shard.name, err) from err

    @staticmethod
    def _declared_columns(trainer: L.Trainer) -> Sequence[str] | None:
        return getattr(trainer.datamodule, "prediction_columns", None)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.finish(trainer)

    def finish(self, trainer: L.Trainer) -> None:
        """Close this rank's shard and, once every rank has, merge them all into the file on rank 0. A rank without
        rows skips the prediction loop: call this after `Trainer.predict` too, so that it meets the others."""
        if self.written is not None:
            return
        self._shard.close()
        trainer.strategy.barrier("prediction-shards-written")
        if trainer.is_global_zero:
            count = merge_shards(self._out, trainer.world_size, self._declared_columns(trainer), self._generation)
            rank_zero_info(f"Predictions of {count} images written to {self._out}")
        # The file exists on every rank once predict returns.
        trainer.strategy.barrier("prediction-file-written")
        self.written = self._out

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._shard is not None:
            try:
                self._shard.close()
            except OSError:
                pass  # the disk is still full: the error being raised says so


# ---- rank 0: merge ---------------------------------------------------------------------------------------------


def parts_folder(out: Path) -> Path:
    """Where the ranks' shards of the file `out` are, until they are merged into it."""
    return out.with_name(out.name + ".parts")


def _shard_name(rank: int, generation: int = 0) -> str:
    """Generation 0 is a loop's first; each resumed loop writes the next."""
    return f"rank{rank:05d}.jsonl" if generation == 0 else f"rank{rank:05d}-resumed{generation:03d}.jsonl"


def _shards(parts: Path) -> list[Path]:
    return sorted(parts.glob("rank*.jsonl"))


def _generation(shard: Path) -> int:
    _, _, resumed = shard.stem.partition("-resumed")
    return int(resumed or 0)


def done_rows(out: str | os.PathLike) -> set[int]:
    """The row indices whose predictions the shards of `out` hold: what an interrupted loop finished."""
    return {row["index"] for shard in _shards(parts_folder(Path(out))) for row in _read_shard(shard)}


def merge_shards(out: Path, world_size: int, columns: Sequence[str] | None = None, generation: int = 0) -> int:
    """Merge every shard of `out` by row index into `out`, remove them, and return the number of rows. The last
    loop (`generation`) must have left one shard per rank of `world_size`, else the ranks do not share the file
    system; a row twice or out of order is a RuntimeError."""
    parts = parts_folder(out)
    shards = [parts / _shard_name(rank, generation) for rank in range(world_size)]
    missing = [str(shard) for shard in shards if not shard.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the predictions of some ranks are missing ({', '.join(missing)}): put the predictions file on a file "
            "system every node sees"
        )
    rows = _unique(heapq.merge(*(_read_shard(shard) for shard in _shards(parts)), key=lambda row: row["index"]))
    count = write_rows(out, rows, columns)
    shutil.rmtree(parts)
    return count


def _read_shard(path: Path) -> Iterator[dict[str, Any]]:
    last = None
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            try:
                row = json.loads(line) if line.endswith("\n") else None
            except ValueError:
                row = None
            if row is None:
                break  # the last line, torn by a killed loop or a full disk: its row was not done
            if last is not None and row["index"] < last:
                raise RuntimeError(f"{path}: rows are not in increasing index order ({last} before {row['index']})")
            last = row["index"]
            yield row


def _unique(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    last = None
    for row in rows:
        if row["index"] == last:
            # A padding sampler (torch's DistributedSampler) repeats rows; evaluation samplers must not.
            raise RuntimeError(f"row {last} was predicted twice: the predict loader's sampler repeats rows")
        last = row["index"]
        yield row


# ---- formats ---------------------------------------------------------------------------------------------------


def write_rows(path: str | os.PathLike, rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None) -> int:
    """Stream rows (dicts) into a CSV, JSON lines or Parquet file, by its extension, in `columns` (by default the
    first row's but ``index``); returns the number of rows. The file is written under a temporary name and renamed,
    so it is never seen half-written."""
    path = checked_path(path)
    rows = iter(rows)
    first = next(rows, None)
    if columns is None:
        columns = [key for key in (first or {}) if key != "index"]
    rows = rows if first is None else chain([first], rows)
    partial = path.with_name(path.name + ".partial")
    suffix = path.suffix.lower()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".parquet":
            count = _write_parquet(partial, rows, list(columns))
        else:
            with partial.open("w", newline="", encoding="utf-8") as stream:
                count = (_write_csv if suffix == ".csv" else _write_jsonl)(stream, rows, list(columns))
        os.replace(partial, path)
    except OSError as err:  # read-only folder, full disk, file-size limit: the partial file would only take room
        partial.unlink(missing_ok=True)
        raise write_error(path, err) from err
    return count


def _write_csv(stream, rows: Iterable[dict[str, Any]], columns: list[str]) -> int:
    writer = csv.writer(stream)
    writer.writerow(columns)
    count = 0
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
        count += 1
    return count


def _write_jsonl(stream, rows: Iterable[dict[str, Any]], columns: list[str]) -> int:
    count = 0
    for row in rows:
        stream.write(json.dumps({c: row.get(c) for c in columns}, ensure_ascii=False) + "\n")
        count += 1
    return count


def _write_parquet(path: Path, rows: Iterable[dict[str, Any]], columns: list[str]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def kind(column: str) -> pa.DataType:
        return pa.float64() if column in FLOAT_COLUMNS else pa.int64() if column == "index" else pa.string()

    schema = pa.schema([(column, kind(column)) for column in columns])
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        while batch := list(islice(rows, PARQUET_ROWS)):
            writer.write_table(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in batch], schema))
            count += len(batch)
    return count
