"""`mst-clipiqa benchmark`: a protocol's splits x head variants x targets, each fitted (`mst-clipiqa fit` on the same
options, with the variant, target and split set) and tested at its best checkpoint, with per-split and median/mean
SRCC, PLCC and KRCC; with ``--cross``, also tested on other releases. The frozen features come from the feature cache,
so the whole protocol costs one encoder pass plus the heads' training.
"""

from __future__ import annotations

import gc
import importlib
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from mst_clipiqa.cli.trainer import MSTCLIPIQACLI
from mst_clipiqa.errors import OptionError
from mst_clipiqa.scoring.predictions import write_rows
from mst_clipiqa.training.callbacks import WandbEvaluationLogger

METRICS = ("srcc", "plcc", "krcc")  # summarised over the splits; results.csv also keeps the others
_TEST_METRICS = (*METRICS, "rmse", "plcc_logistic")
_CACHE_COUNTS = ("images_cached", "images_encoded", "prompts_cached", "prompts_encoded")


@dataclass
class RunResult:
    """One fit and test of the benchmark: its test metrics at the best checkpoint (without "test/"), what the feature
    cache read and encoded, the release trained on and the one tested on (`source` for the split's own test part)."""

    variant: str
    target: str
    split: int
    metrics: dict[str, float]
    checkpoint: str
    cache: dict[str, int] = field(default_factory=dict)
    source: str = ""
    test_source: str = ""

    def row(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "target": self.target,
            "split": self.split,
            **{name: self.metrics.get(name) for name in _TEST_METRICS},
            **{name: self.cache.get(name) for name in _CACHE_COUNTS},
            "checkpoint": self.checkpoint,
        }


def summarise(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Per (variant, target): the number of splits and the median, mean and standard deviation of each metric."""
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.variant, result.target), []).append(result)
    summary = []
    for (variant, target), runs in groups.items():
        row: dict[str, Any] = {"variant": variant, "target": target, "splits": len(runs)}
        for name in METRICS:
            values = [run.metrics[name] for run in runs]
            row[f"median_{name}"] = statistics.median(values)
            row[f"mean_{name}"] = statistics.fmean(values)
            row[f"std_{name}"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(row)
    return summary


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def cross_rows(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Per (train source, variant, target, test source): the number of splits and the median of each metric."""
    groups: dict[tuple[str, str, str, str], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.source, result.variant, result.target, result.test_source), []).append(result)
    return [
        {
            "source": source,
            "variant": variant,
            "target": target,
            "test_source": test_source,
            "splits": len(runs),
            **{f"median_{name}": statistics.median(run.metrics[name] for run in runs) for name in METRICS},
        }
        for (source, variant, target, test_source), runs in groups.items()
    ]


def cross_matrix(rows: Sequence[dict[str, Any]]) -> str:
    """The train x test matrix of `cross_rows`: a row per (train source, variant, target), a column per test source,
    median SRCC / PLCC in each cell; the diagonal is the own split's test part."""
    tests = sorted({row["test_source"] for row in rows})
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    for row in rows:
        cell = f"{row['median_srcc']:.4f} / {row['median_plcc']:.4f}"
        if row["test_source"] == row["source"]:
            cell += " (own split)"
        cells.setdefault((row["source"], row["variant"], row["target"]), {})[row["test_source"]] = cell
    table = [
        {"train": source, "variant": variant, "target": target, **{test: got.get(test, "") for test in tests}}
        for (source, variant, target), got in cells.items()
    ]
    return markdown_table(table, ["train", "variant", "target", *tests])


def write_cross(folder: Path, results: Sequence[RunResult], title: str) -> str:
    """cross.csv (every run, own and cross tests) and cross.md (`cross_matrix`) in `folder`; returns the markdown."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"source": r.source, "test_source": r.test_source, **r.row()} for r in results]
    write_rows(folder / "cross.csv", rows)
    text = (
        f"# {title}: cross-dataset\n\nMedian SRCC / PLCC over the splits; rows: trained on, columns: tested on "
        f"(every labelled row; the own split's test part on the diagonal).\n\n{cross_matrix(cross_rows(results))}\n"
    )
    (folder / "cross.md").write_text(text, encoding="utf-8")
    return text


def _logger_configs(value: Any) -> list[Namespace]:
    """The class_path/init_args entries of a parsed `trainer.logger` (one, a list, or True/False/None)."""
    items = value if isinstance(value, list) else [value]
    return [item for item in items if isinstance(item, Namespace) and "class_path" in item]


def _is_wandb(config: Namespace) -> bool:
    module, name = config.class_path.rsplit(".", 1)
    return issubclass(getattr(importlib.import_module(module), name), WandbLogger)


class _RunCLI(MSTCLIPIQACLI):
    """`MSTCLIPIQACLI` without a subcommand, whose parsed config `configure` adjusts before anything is built."""

    def __init__(self, args: list[str], configure: Callable[[Namespace], None], parsers: dict[str, Any]):
        self.configure = configure
        self.parsers = parsers
        super().__init__(args=args, run=False)

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        """The parser of the benchmark's first run, built once (seconds) for every run; parsing leaves it as it
        was."""
        if "run" not in self.parsers:
            super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
            self.parsers["run"] = self.parser
        self.parser = self.parsers["run"]

    def add_arguments_to_parser(self, parser) -> None:
        """The fit's options, and those of the Trainer's commands, which a run's saved config.yaml also holds: it
        configures a benchmark as it does any command."""
        super().add_arguments_to_parser(parser)
        added: set[str] = set()
        for command, skip in self.subcommands().items():
            new = parser.add_method_arguments(self.trainer_class, command, skip=skip | added)
            if command != "fit":
                self.parsers.setdefault("not_fit", set()).update(new)
            added.update(new)

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        if self.config.get("ckpt_path"):
            rank_zero_warn(f"ckpt_path {self.config.ckpt_path} is ignored: every run of a benchmark starts afresh")
        self.configure(self.config)
        # Each run is a fit: its config.yaml holds a fit's options, and configures any command as a fit's does.
        for key in self.parsers.get("not_fit", ()):
            if key in self.config:
                del self.config[key]


class Benchmark:
    """Fits and tests every (variant, target, split), then reports; the options are the command's
    (`cli.commands.benchmark`), `cross` as release → folder."""

    def __init__(
        self,
        fit_args: Sequence[str],
        *,
        splits: int | None = None,
        variants: Sequence[str] | None = None,
        targets: Sequence[str] | None = None,
        output: str | Path | None = None,
        name: str | None = None,
        together: bool = False,
        cross: Mapping[str, str] | None = None,
    ):
        if cross and together:
            raise OptionError("--cross tests each run's best checkpoint: run it without --together")
        self.fit_args = list(fit_args)
        self.together = together
        self.cross = dict(cross or {})
        self.cross_results: list[RunResult] = []
        self.splits = splits
        self.variants: list[str | None] = list(variants) if variants else [None]
        self.targets: list[str | None] = list(targets) if targets else [None]
        self.output = Path(output) if output is not None else None
        self.name = name or time.strftime("benchmark-%Y%m%d-%H%M%S")
        self.results: list[RunResult] = []
        self._run: tuple[str, str, int] = ("", "", 0)  # (variant, target, split) of the run being built
        self.source = ""  # the runs' data.source
        self._logger_config: Any = None
        self._parsers: dict[str, Any] = {}  # the runs' parser, built by the first (`_RunCLI.setup_parser`)

    def run(self) -> list[RunResult]:
        """Every run in turn; returns the results and writes the reports."""
        # What lives now (the imported libraries) lives as long as the process: kept out of the collection after
        # each run, which then is quick. Garbage is collected first, or an earlier benchmark's last run would stay.
        gc.collect()
        gc.freeze()
        try:
            for variant in self.variants:
                for target in self.targets:
                    if self.together:
                        self._fit_and_test_together(variant, target)
                        continue
                    available = self._fit_and_test(variant, target, 0)
                    if self.splits is not None and self.splits > available:
                        raise OptionError(f"--splits {self.splits}: the protocol makes only {available} splits")
                    for split in range(1, available if self.splits is None else self.splits):
                        self._fit_and_test(variant, target, split)
        finally:
            gc.unfreeze()
        self.report()
        return self.results

    def _cli(self, variant: str | None, target: str | None, split: int) -> _RunCLI:
        """The fit's options with the run's variant, target and split: its model, data module and Trainer, built."""
        options = ["--data.split_index", str(split)]
        options += ["--model.net.variant", variant] if variant else []
        options += ["--data.target", target] if target else []
        return _RunCLI([*self.fit_args, *options], self._configure, self._parsers)

    def _fit_and_test(self, variant: str | None, target: str | None, split: int) -> int:
        """One run; its result joins `results`. Returns the number of splits the protocol makes."""
        cli = self._cli(variant, target, split)
        trainer, data = cli.trainer, cli.datamodule
        trainer.fit(cli.model, datamodule=data)
        (metrics,) = trainer.test(cli.model, datamodule=data, ckpt_path="best", verbose=False)
        self._finish_wandb(trainer)
        variant, target, split = self._run
        result = RunResult(
            variant=variant,
            target=target,
            split=split,
            metrics={key.removeprefix("test/"): value for key, value in metrics.items()},
            checkpoint=trainer.checkpoint_callback.best_model_path,
            cache=asdict(data.features.stats) if data.features is not None else {},
            source=self.source,
            test_source=self.source,
        )
        self.results.append(result)
        if self.cross:
            self._test_across(cli.model, trainer, data, result)
        available = len(data.all_splits())
        del cli, trainer, data
        gc.collect()  # the frozen towers of this run (held in reference cycles), before the next run loads its own
        return available

    def _test_across(self, model, trainer, data, own: RunResult) -> None:
        """Test the run's best checkpoint on every labelled row of each `cross` release but its own."""
        self.cross_results.append(own)
        # Its per-sample report looks rows up in the run's own table.
        kept = trainer.callbacks[:]
        trainer.callbacks[:] = [c for c in kept if not isinstance(c, WandbEvaluationLogger)]
        try:
            for source, root in self.cross.items():
                if source == own.source:
                    continue
                data.test_on(source, root)
                (metrics,) = trainer.test(model, datamodule=data, ckpt_path="best", verbose=False)
                metrics = {key.removeprefix("test/"): value for key, value in metrics.items()}
                self.cross_results.append(replace(own, metrics=metrics, cache={}, test_source=source))
        finally:
            data.test_on(None)
            trainer.callbacks[:] = kept

    def _fit_and_test_together(self, variant: str | None, target: str | None) -> None:
        """The protocol's splits (the first `splits`) in one fit and one test; their results join `results`."""
        from mst_clipiqa.training.together import TogetherData, TogetherModule, check_trainer

        cli = self._cli(variant, target, 0)
        trainer = cli.trainer
        check_trainer(trainer)
        # Each member keeps its best weights itself; the per-sample W&B report would mix the members' rows.
        trainer.callbacks[:] = [
            c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint | WandbEvaluationLogger)
        ]
        model, data = TogetherModule(cli.model), TogetherData(cli.datamodule, self.splits)
        trainer.fit(model, datamodule=data)
        trainer.test(model, datamodule=data, verbose=False)
        self._finish_wandb(trainer)
        variant, target, _ = self._run
        stats = asdict(data.data.features.stats) if data.data.features is not None else {}
        for k in range(len(data.splits)):
            # The cache's counts are the fit's: on its first split's row.
            cache = stats if k == 0 else {}
            self.results.append(RunResult(variant, target, k, model.results[k], model.checkpoints.get(k, ""), cache))
        del cli, trainer, data, model
        gc.collect()

    def _configure(self, config: Namespace) -> None:
        """Name the run being built for the configured loggers and give it its own default folder. A run keeps its
        best checkpoint only: last.ckpt, rewritten at every epoch to resume from, serves nothing here, where every
        run starts afresh."""
        self._run = (config.model.net.variant, config.data.target, config.data.split_index)
        self.source = config.data.source
        run_name = "{}-{}-{}".format(*self._run[:2], "together" if self.together else f"split{self._run[2]}")
        if self.output is None:
            self.output = Path(config.trainer.default_root_dir or ".") / self.name
        config.trainer.default_root_dir = str(self.output / run_name)
        config.checkpoint.save_last = False
        for logger in _logger_configs(config.trainer.logger):
            init = logger.init_args
            if _is_wandb(logger):
                init.name = run_name
                init.group = init.get("group") or self.name
            elif "version" in init and "name" in init:  # CSV, TensorBoard: <save_dir>/<name>/<run>
                init.name, init.version = self.name, run_name
        self._logger_config = config.trainer.logger

    @staticmethod
    def _finish_wandb(trainer) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()  # the next run starts its own W&B run

    # ---- reports ---------------------------------------------------------------------------------------------------

    @rank_zero_only
    def report(self) -> None:
        """Write results.csv, summary.csv and results.md to the output folder, print them, and log them to W&B."""
        rows = [result.row() for result in self.results]
        summary = summarise(self.results)
        self.output.mkdir(parents=True, exist_ok=True)
        write_rows(self.output / "results.csv", rows)
        write_rows(self.output / "summary.csv", summary)
        text = (
            f"# {self.name}\n\n## Summary over splits\n\n{markdown_table(summary, list(summary[0]))}\n\n"
            f"## Per split\n\n{markdown_table(rows, [c for c in rows[0] if c != 'checkpoint'])}\n"
        )
        (self.output / "results.md").write_text(text, encoding="utf-8")
        print(text)
        if self.cross_results:
            print(write_cross(self.output, self.cross_results, self.name))
        print(f"Reports in {self.output}")
        self._log_to_wandb(rows, summary)

    def _log_to_wandb(self, rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> None:
        """One more run of the benchmark's W&B group, "<name>-summary", with both tables and the medians."""
        import wandb

        def table(records: list[dict[str, Any]]) -> wandb.Table:
            return wandb.Table(columns=list(records[0]), data=[list(record.values()) for record in records])

        for config in _logger_configs(self._logger_config):
            if not _is_wandb(config):
                continue
            init = config.as_dict()
            init["init_args"]["name"] = f"{self.name}-summary"
            run = instantiate_class((), init).experiment
            run.log({"benchmark/runs": table(rows), "benchmark/summary": table(summary)})
            for row in summary:
                for name in METRICS:
                    run.summary[f"{row['variant']}/{row['target']}/median_{name}"] = row[f"median_{name}"]
            run.finish()


def cross_benchmark(
    fit_args: Sequence[str],
    configs: Sequence[str],
    cross: Mapping[str, str],
    *,
    output: str | Path,
    name: str,
    **options,
) -> list[RunResult]:
    """A `Benchmark` with `cross` per config (each a row of the matrix), reported in ``<output>/<config's stem>``; the
    matrix of them all goes to ``<output>/cross.md`` and ``<output>/cross.csv``. `fit_args` follow each config, so
    they apply to every one. Returns every own and cross test."""
    results: list[RunResult] = []
    for config in configs:
        bench = Benchmark(
            ["--config", str(config), *fit_args],
            output=Path(output) / Path(config).stem,
            name=name,
            cross=cross,
            **options,
        )
        bench.run()
        results += bench.cross_results
    print(write_cross(Path(output), results, name))
    return results
