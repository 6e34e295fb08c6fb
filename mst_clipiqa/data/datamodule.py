"""The LightningDataModule: a data source, a split protocol, MOS targets and loaders."""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning as L
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mst_clipiqa.data.checks import check_dataset, image_problems
from mst_clipiqa.data.features import FeatureRows, TableFeatures, collate_features
from mst_clipiqa.data.preprocess import ClipPreprocess, ImageRows
from mst_clipiqa.data.releases import RELEASES
from mst_clipiqa.data.samplers import EvalDistributedSampler
from mst_clipiqa.data.schema import row_label, target_column
from mst_clipiqa.data.splits import Split, load_splits, make_splits, predict_indices, save_splits
from mst_clipiqa.data.tables import Columns, load_source
from mst_clipiqa.errors import BadImageError, OptionError
from mst_clipiqa.model import MSTCLIPIQA, ModelConfig
from mst_clipiqa.training import checkpoints

log = logging.getLogger(__name__)


def _columns(options: Columns | Mapping[str, Any] | None) -> Columns | None:
    """`source_options` as a `Columns`: given as one, or as the dict a checkpoint stores (`load_from_checkpoint`)."""
    if options is None or isinstance(options, Columns):
        return options
    keys = [field.name for field in fields(Columns)]
    if "mos_columns" not in options or any(key not in keys for key in options):
        raise OptionError(f"data.source_options {dict(options)}: expected mos_columns and any of {', '.join(keys[1:])}")
    return Columns(**options)


@dataclass(frozen=True)
class ModelSettings:
    """What the data owes the model: set by `IQADataModule.follow`, never given apart from the model."""

    need_prompt: bool
    """Every row must have a prompt: the prompt head (variant B)."""
    preprocess_from: str
    """The CLIP checkpoint whose preprocessing both towers read: the coarse encoder."""
    draft_decode: bool
    """Faster, reduced-size JPEG decoding (Pillow draft mode), as the model scores."""

    @classmethod
    def of(cls, config: ModelConfig) -> ModelSettings:
        return cls(config.variant == "prompt", config.coarse_encoder, config.draft_decode)


def _network_config(model: Any) -> ModelConfig | None:
    """The network settings of an `MSTCLIPIQAModule`, an `MSTCLIPIQA` or a `ModelConfig`; None for anything else."""
    config = getattr(getattr(model, "net", model), "config", model)
    return config if isinstance(config, ModelConfig) else None


def default_workers(requested: int | None) -> int:
    """`requested` loader workers, else one per spare CPU core, at most 8."""
    return min(8, max(0, (os.cpu_count() or 1) - 1)) if requested is None else requested


def prepare_features(
    features: TableFeatures, rows: Sequence[int], trainer: L.Trainer, progress: bool
) -> dict[int, str]:
    """`TableFeatures.prepare` of `rows` with the trainer's network and ranks (each encodes a share, all read the
    union); every rank calls it with the same rows. Returns {row: why} of the images that cannot be read."""
    return features.prepare(
        rows,
        trainer.lightning_module.net,
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        broadcast=trainer.strategy.broadcast,
        barrier=trainer.strategy.barrier,
        progress=progress and trainer.is_global_zero,
    )


def rows_loader(
    dataset: Dataset, batch_size: int, trainer: L.Trainer | None, num_workers: int, *, shuffle_seed: int | None = None
) -> DataLoader:
    """A loader of table rows: shuffled by (`shuffle_seed`, epoch) and sharded for training; otherwise in order,
    each row once over all ranks. Cached features (`FeatureRows`) are read in the main process."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    if shuffle_seed is not None:
        # Shuffled from (seed, epoch), one process or many: the global RNG is not in checkpoints, so a run
        # resumed from one sees the same batches as a run that was never interrupted.
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=shuffle_seed)
    else:
        # Every evaluation row exactly once across ranks: padded duplicates would bias SRCC.
        sampler = EvalDistributedSampler(dataset, num_replicas=world, rank=rank)
    features = isinstance(dataset, FeatureRows)
    workers = 0 if features else num_workers  # in-memory tensors: workers would only add start-up and transfer time
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_features if features else None,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=trainer is not None and trainer.strategy.root_device.type == "cuda",
        drop_last=False,
    )


class IQADataModule(L.LightningDataModule):
    """Quality data (an official release, a table or a Hugging Face dataset), split by one of the papers' protocols.

    Args:
        source: reader: agiqa-1k, agiqa-3k, aigciqa2023, aigiqa-20k, evalmi-50k, table (CSV/TSV/JSONL/Parquet/xlsx)
            or hf.
        root: the release's folder (or the table file, or a hub id / save_to_disk folder for hf).
        source_options: the column mapping of a table or hf source (--data.source_options.help lists its fields);
            none for the official releases, which read their own files.
        target: which MOS to learn: quality, alignment (= correspondence) or authenticity.
        protocol: random (image-level), prompt (prompt-disjoint), kfold, or official (the release's own split).
        split_index: which of the protocol's splits (or folds) this run uses.
        n_splits: number of random / prompt-disjoint splits.
        train_fraction: share of the rows (or prompts) in train+val for random and prompt splits.
        val_fraction: share of the train part held out for validation; the test part is never touched.
        folds: k of kfold.
        seed: seed of the splits.
        splits_file: read the splits from this file (a run's splits.json, or one of experiments/splits/) instead of
            making them.
        on_bad: what to do with bad rows or images found at setup: 'error' stops with one message naming them all,
            'drop' removes them; either way every one is listed in dropped_rows.csv in the run folder.
        check_images: check every image at setup, so a broken file fails now and not hours into training. With
            `features` (under a Trainer) the encoding pass is the check: it decodes the images the cache lacks, once,
            and an image the cache holds, encoded from the same file, is not decoded again.
        batch_size: training batch size (per device).
        eval_batch_size: validation, test and predict batch size (per device).
        num_workers: data loader workers; None picks from the CPU count. With `features`, they decode the images
            the cache lacks while the towers encode; the loaders themselves read tensors in the main process.
        mos_range: the nominal (low, high) of the data's MOS scale, mapped onto the head's 1..5, e.g. [0, 5] or
            [1, 10]; None takes the min and max of the training rows. A model trained here scores on this scale.
        predict_split: rows scored by `predict`: test, val, train, all, or unlabeled (official test sets, whose file
            then holds name, prompt and score only, ready to submit).
        features: read each image's two frozen embeddings (and each prompt's token states) from the feature cache,
            encoding only what it lacks, once, with the trainer's model (see `mst_clipiqa.data.features`). False
            decodes pixels and runs both frozen towers at every step.
        cache_dir: the feature cache folder; None for $MST_CLIPIQA_FEATURES, else ~/.cache/mst_clipiqa/features.
        content_hash: key cached images by a hash of their bytes rather than their path, size and mtime.
        test_source: test on every labelled row of another official release (cross-dataset) instead of the split's
            test part: its `data.source` name, e.g. agiqa-1k; the rest (target, checks, features) as for `source`.
        test_root: the folder of `test_source`.
    """

    def __init__(
        self,
        source: str = "agiqa-3k",
        root: str = "",
        source_options: Columns | None = None,
        target: Literal["quality", "alignment", "correspondence", "authenticity"] = "quality",
        protocol: Literal["random", "prompt", "kfold", "official"] = "random",
        split_index: int = 0,
        n_splits: int = 10,
        train_fraction: float = 0.8,
        val_fraction: float = 0.1,
        folds: int = 5,
        seed: int = 0,
        splits_file: str | None = None,
        on_bad: Literal["error", "drop"] = "error",
        check_images: bool = True,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int | None = None,
        mos_range: tuple[float, float] | None = None,
        predict_split: Literal["test", "val", "train", "all", "unlabeled"] = "test",
        features: bool = True,
        cache_dir: str | None = None,
        content_hash: bool = False,
        test_source: str | None = None,
        test_root: str | None = None,
    ):
        super().__init__()
        if mos_range is not None and not (all(map(math.isfinite, mos_range)) and mos_range[0] < mos_range[1]):
            raise OptionError(f"data.mos_range must be [low, high] with low < high, not {list(mos_range)}")
        self.columns = _columns(source_options)
        """The column mapping of a table or hf source; None for an official release."""
        # Saved as plain data: checkpoints are read with weights_only=True, and loggers record the hyperparameters.
        source_options = asdict(self.columns) if self.columns is not None else None
        self.save_hyperparameters()
        self.table: datasets.Dataset | None = None
        self.split: Split | None = None
        self.preprocess: ClipPreprocess | None = None
        self.features: TableFeatures | None = None
        self.images_checked = 0
        """Images the setup check decoded itself, outside the feature cache's encoding pass."""
        self.model_settings = ModelSettings.of(ModelConfig())
        """What the data owes the model (`follow`); a default model's until then."""
        self._cross: IQADataModule | None = None
        self.dropped_rows_name = "dropped_rows.csv"
        """The file in the run folder that lists the rows the setup check dropped or refused."""
        self.test_on(test_source, test_root)

    # ---- setup ---------------------------------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path | None:
        """The run's own folder, next to its checkpoints (`training.checkpoints.run_dir`); None without a Trainer.
        Read it on every rank: it is a broadcast."""
        trainer = self.trainer
        if trainer is None:
            return None
        return checkpoints.run_dir(trainer)

    def load_table(self) -> datasets.Dataset:
        """The checked table of the whole source (read and validated once per process)."""
        if self.table is None:
            hp = self.hparams
            if hp.source != "hf" and not Path(hp.root).expanduser().exists():  # an hf root may be a hub id
                what = "table file" if hp.source == "table" else f"{hp.source} release's folder"
                raise FileNotFoundError(f"data.root {hp.root}: no such file or folder; set --data.root to the {what}")
            table = load_source(hp.source, hp.root, self.columns)
            report = self.run_dir / self.dropped_rows_name if self.run_dir is not None else None
            self.table = check_dataset(
                table,
                target=hp.target,
                need_prompt=self.model_settings.need_prompt,
                check_images=self._image_problems if hp.check_images else False,
                on_bad=hp.on_bad,
                report_path=report,
            )
            if self.features is not None and self.table is not table:
                # Names of the rows kept are unique (a name listed twice is bad): they find each row's features.
                position = {name: row for row, name in enumerate(table["name"][:])}
                self.features = self.features.select(self.table, [position[name] for name in self.table["name"][:]])
        return self.table

    def _image_problems(self, table: datasets.Dataset) -> list[tuple[int, str]]:
        """(row, why) of every bad image of the source's table, for `check_dataset`.

        With `features` under a Trainer, the feature cache's encoding pass over the whole table, on the device the
        trainer trains on, is the check: it decodes only the images the cache lacks. It runs before any split is
        made, so the splits never depend on what the cache held. Otherwise every image is decoded here.
        """
        net = self._net()
        if not self.hparams.features or net is None:
            self.images_checked += len(table)
            return image_problems(table)
        net.to(self.trainer.strategy.root_device)
        self.features = self._table_features(table)
        return sorted(self._prepare(range(len(table))).items())

    def all_splits(self) -> list[Split]:
        hp = self.hparams
        table = self.load_table()
        if hp.splits_file:
            return load_splits(hp.splits_file, table)
        return make_splits(
            table,
            hp.protocol,
            target=hp.target,
            n_splits=hp.n_splits,
            k=hp.folds,
            train_fraction=hp.train_fraction,
            val_fraction=hp.val_fraction,
            seed=hp.seed,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        # The trainer's model, whose network may come from a saved one (`MSTCLIPIQAModule`'s ``init_from``).
        model = self.trainer.lightning_module if self.trainer is not None else None
        if _network_config(model) is not None:
            self.follow(model)
        hp = self.hparams
        self.preprocess = ClipPreprocess.from_pretrained(self.model_settings.preprocess_from)
        splits = self.all_splits()
        self.split = self.split_at(hp.split_index, stage, splits)
        # Read on every rank: Trainer.log_dir is a broadcast, which rank 0 alone would wait on forever under DDP.
        self._write_splits(splits, self.run_dir)
        train, val, test = self.split.train, self.split.val, self.split.test
        log.info("split %s: %d train, %d val, %d test", self.split.name, len(train), len(val), len(test))

    def split_at(self, index: int, stage: str | None, splits: list[Split] | None = None) -> Split:
        """The protocol's split `index`, checked for `stage`: evaluation needs at least 2 rows to rank."""
        splits = self.all_splits() if splits is None else splits
        if not 0 <= index < len(splits):
            raise ValueError(f"split_index {index} is out of range: the protocol made {len(splits)} splits")
        split = splits[index]
        for name in ("val", "test"):
            if stage in ("fit", "validate", "test") and 0 < len(getattr(split, name)) < 2:
                raise ValueError(f"the {name} part of split {split.name} has fewer than 2 rows: nothing to rank")
        return split

    def _net(self) -> MSTCLIPIQA | None:
        """The trainer's network, whose frozen towers encode features; None without one."""
        net = getattr(self.trainer.lightning_module, "net", None) if self.trainer is not None else None
        return net if isinstance(net, MSTCLIPIQA) else None

    def follow(self, model: Any) -> IQADataModule:
        """Take the settings the data owes the model from it (`ModelSettings`): whether every row needs a prompt,
        whose preprocessing to use and draft decoding, so training and scoring see the same pixels. `setup` does
        this with the trainer's model, the one way these settings reach the data; call it before `setup` when the
        data module is used without a Trainer (until then it follows a default `ModelConfig`).

        Args:
            model: an `MSTCLIPIQAModule`, an `MSTCLIPIQA` or a `ModelConfig`.

        Returns:
            This data module.
        """
        config = _network_config(model)
        if config is None:
            raise TypeError(f"follow takes an MSTCLIPIQAModule, an MSTCLIPIQA or a ModelConfig, not {type(model)}")
        wanted = ModelSettings.of(config)
        if wanted != self.model_settings and self.split is not None:
            raise RuntimeError("follow the model before setup: the data is already prepared with other settings")
        self.model_settings = wanted
        return self

    @rank_zero_only
    def _write_splits(self, splits: list[Split], run_dir: Path | None) -> None:
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_splits(splits, checkpoints.new_run_file(self.trainer, run_dir, "splits.json"), self.load_table())

    @property
    def mos_range(self) -> tuple[float, float]:
        """The data's MOS scale (low, high), onto which the head's 1..5 maps: the `mos_range` option, else the
        (min, max) of the target MOS over the training rows."""
        self.setup("fit")
        return self.mos_range_of(self.split)

    def mos_range_of(self, split: Split) -> tuple[float, float]:
        """`mos_range` of another split of the protocol."""
        values = self.load_table().select(split.train)[target_column(self.hparams.target)][:]
        low, high = float(min(values)), float(max(values))
        if self.hparams.mos_range is None:
            return low, high
        nominal = float(self.hparams.mos_range[0]), float(self.hparams.mos_range[1])
        if low < nominal[0] or high > nominal[1]:
            rank_zero_warn(
                f"the training MOS span [{low:g}, {high:g}], beyond data.mos_range [{nominal[0]:g}, {nominal[1]:g}]: "
                "the template head cannot score outside that range; set data.mos_range to your scale's low and high"
            )
        return nominal

    # ---- loaders -------------------------------------------------------------------------------------------------

    def feature_rows(self, rows: list[int]) -> FeatureRows:
        """Cached features of `rows`, after encoding what the cache lacks with the trainer's frozen towers.

        The first call prepares the whole split too, so one encoding pass (one progress bar) serves every loader;
        with `check_images` the setup check has prepared every row already.

        Raises:
            BadImageError: some images do not decode (possible only without `check_images`); it names them all.
        """
        if self._net() is None:
            raise RuntimeError(
                "features=True encodes with the model's frozen towers: use the data module through a Trainer, "
                "or pass features=False to read pixels"
            )
        if self.features is None:
            self.features = self._table_features(self.load_table())
        bad = self._prepare([*rows, *self.split.train, *self.split.val, *self.split.test])
        if bad:
            names = self.features.table.select_columns(["name"])[sorted(bad)]["name"]
            lines = "".join(f"\n  {row_label(name, row)}: {bad[row]}" for name, row in zip(names, sorted(bad)))
            raise BadImageError(
                f"{len(bad)} images do not decode; set data.check_images true to find them at setup and "
                f"data.on_bad drop to leave them out:{lines}"
            )
        return FeatureRows(self.features, rows, self.hparams.target)

    def _table_features(self, table: datasets.Dataset) -> TableFeatures:
        hp = self.hparams
        return TableFeatures(
            table,
            self.preprocess,
            draft_decode=self.model_settings.draft_decode,
            cache_dir=hp.cache_dir,
            content_hash=hp.content_hash,
            batch_size=hp.eval_batch_size,
            num_workers=default_workers(hp.num_workers),
        )

    def _prepare(self, rows: list[int] | range) -> dict[int, str]:
        trainer = self.trainer
        return prepare_features(self.features, rows, trainer, progress=trainer.progress_bar_callback is not None)

    def loader(self, rows: list[int], train: bool) -> DataLoader:
        """Rows of the table: shuffled by (seed, epoch) and sharded for training, in order, each once, for the rest."""
        hp = self.hparams
        if hp.features:
            dataset = self.feature_rows(rows)
        else:
            column = target_column(hp.target)
            dataset = ImageRows(self.load_table(), rows, column, self.preprocess, self.model_settings.draft_decode)
        return rows_loader(
            dataset,
            hp.batch_size if train else hp.eval_batch_size,
            self.trainer,
            default_workers(hp.num_workers),
            shuffle_seed=hp.seed if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.split.train, train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.split.val, train=False)

    def test_dataloader(self) -> DataLoader:
        if self.hparams.test_source is not None:
            return self._cross_data().loader(self._cross.split.test, train=False)
        return self.loader(self.split.test, train=False)

    # ---- cross-dataset tests -------------------------------------------------------------------------------------

    def test_on(self, source: str | None, root: str | None = None) -> None:
        """Test on every labelled row of another official release from now on (None: on the split's test part).

        Raises:
            OptionError: a source that is not an official release, or one without its root.
        """
        if source is not None and source not in RELEASES:
            raise OptionError(f"data.test_source {source!r} is not an official release: one of {', '.join(RELEASES)}")
        if source is not None and not root:
            raise OptionError(f"data.test_source {source} needs data.test_root, the release's folder")
        self.hparams.test_source, self.hparams.test_root = source, root if source is not None else None
        self._cross = None

    def _cross_data(self) -> IQADataModule:
        """The data module of `test_source`, with this one's settings and trainer; its test part is every row that
        carries the target MOS."""
        if self._cross is None:
            hp = self.hparams
            settings = {name: hp[name] for name in inspect.signature(IQADataModule).parameters if name in hp}
            settings |= {"source": hp.test_source, "root": hp.test_root, "source_options": None, "splits_file": None}
            cross = IQADataModule(**{**settings, "test_source": None, "test_root": None})
            cross.trainer = self.trainer
            cross.dropped_rows_name = f"dropped_rows_{hp.test_source}.csv"
            cross.preprocess, cross.model_settings = self.preprocess, self.model_settings
            column = target_column(hp.target)
            labelled = [row for row, mos in enumerate(cross.load_table()[column][:]) if mos is not None]
            if not labelled:
                raise OptionError(f"data.test_source {hp.test_source}: no row carries {column}")
            cross.split = Split(f"all of {hp.test_source}", (), (), tuple(labelled), protocol="all")
            self._cross = cross
        return self._cross

    def predict_rows(self) -> list[int]:
        which = self.hparams.predict_split
        if which == "all":
            return list(range(len(self.load_table())))
        if which == "unlabeled":
            return list(predict_indices(self.load_table(), self.hparams.target))
        return list(getattr(self.split, which))

    def predict_dataloader(self) -> DataLoader:
        return self.loader(self.predict_rows(), train=False)

    # ---- prediction files (see `scoring.predictions.PredictionWriter`) -----------------------------------------------

    @property
    def prediction_columns(self) -> tuple[str, ...]:
        """Columns of the prediction file: name, prompt, score, MOS and the gate's coarse share; for the unlabeled
        rows of an official test set, name, prompt and score, ready to submit."""
        if self.hparams.predict_split == "unlabeled":
            return "name", "prompt", "score"
        return "name", "prompt", "score", "mos", "coarse_share"

    def describe_rows(self, index: list[int]) -> list[dict[str, Any]]:
        """Name, prompt and MOS (None where unknown) of the given table rows."""
        column = target_column(self.hparams.target)
        values = self.load_table().select_columns(["name", "prompt", column])[list(index)]
        return [
            {"name": name, "prompt": prompt, "mos": mos}
            for name, prompt, mos in zip(values["name"], values["prompt"], values[column])
        ]
