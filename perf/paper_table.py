"""The paper's whole table on stand-ins of the five benchmarks, and where its time goes.

    python perf/paper_table.py --scale 0.05 --workdir DIR [--clip random|tiny|hub] [--splits N] [--epochs N]
        [--benchmarks agiqa-1k agiqa-3k aigciqa2023 aigiqa-20k evalmi-50k] [--workers N] [--alone] [any fit option]

1. Towers. ``--clip random`` (the default) writes CLIPs of the exact openai/clip-vit-base-patch32 and -patch16 shapes
   with random weights as a Hugging Face hub cache in DIR/hub (`standins.build_random_hub_cache`) and
   runs offline on it, so the configs load them by id, unchanged: time and memory are the real models', scores mean
   nothing. ``tiny`` uses the tests' tiny random towers (a smoke run); ``hub`` loads the configs' ids through the
   environment's own Hugging Face cache and switches (the real weights, where they are).
2. Data. Stand-ins of each benchmark in its official layout at ``--scale`` of its real size, in DIR/data
   (`standins.make_standins`), drawn in ``--workers`` processes (one per CPU by default).
3. The table. Every config of experiments/ for the chosen benchmarks (agiqa1k_*.yaml, ...: heads A and B, each target
   the benchmark has a config for) runs through the benchmark runner (`mst_clipiqa.cli.benchmark.Benchmark`): the first
   ``--splits`` splits of its protocol (all of them by default; AIGIQA-20K's official split is one, EvalMi-50K's
   protocol 5 folds), each fitted for
   the config's epochs (or ``--epochs``) and tested at its best checkpoint, every run reading one feature cache,
   DIR/features. A config's splits train together, in one loop (`training.together`: the same results as one fit
   per split); ``--alone`` runs one fit per split instead. Options the script does not know go to every fit (e.g.
   ``--trainer.accelerator cpu``).
4. The report, printed and written to DIR/paper_table.md, DIR/paper_table.csv (one row per config: median and mean
   SRCC / PLCC, phase times, cache counters) and DIR/paper_table_runs.csv (one row per fit). The runner's own reports
   are in DIR/runs/<config>/. Where splits train together, a fit's phases and cache counters are on its first
   split's row.

Phases. Every run's Trainer gets a profiler that sums three of Lightning's own timed actions: the data module's setup
and its dataloader hooks (reading the release, hashing the files for the cache keys, and the encoding pass over
whatever the cache lacks, which is also the image check: an image is decoded once, for both towers), and the training
epochs (steps, validation, checkpoints). The feature cache counts the images it decoded and encoded, the seconds it
waited for decoded images and the seconds in the towers; the rest of the data phase is reading the release and the
cache. The rest of each config's wall time is the runs' start-up (loading the towers, the template embeddings) and
their tests. The last column projects each phase linearly to the benchmarks' real size (see `PROJECTION`).

Run the same command twice: the second run draws nothing and finds every feature in the cache, so its encode pass
shows what a warm cache still costs.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

PREFIXES = {
    "agiqa-1k": "agiqa1k",
    "agiqa-3k": "agiqa3k",
    "aigciqa2023": "aigciqa2023",
    "aigiqa-20k": "aigiqa20k",
    "evalmi-50k": "evalmi50k",
}
"""Benchmark (its `data.source`) → the file name prefix of its configs in experiments/."""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The script's options, and the fit options left for the runs."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Any other option is passed to every fit, as to `mst-clipiqa fit` (e.g. --trainer.accelerator cpu).",
    )
    parser.add_argument("--workdir", type=Path, required=True, help="folder of the towers, data, cache and reports")
    parser.add_argument("--scale", type=float, default=1.0, help="share of each benchmark's real size (default 1)")
    parser.add_argument(
        "--clip",
        choices=("random", "tiny", "hub"),
        default="random",
        help="random: the real shapes with random weights (default); tiny: tiny random towers; hub: the configs' ids "
        "from the Hugging Face cache",
    )
    parser.add_argument("--benchmarks", nargs="+", choices=tuple(PREFIXES), default=list(PREFIXES))
    parser.add_argument("--splits", type=int, help="run each protocol's first N splits (default: all)")
    parser.add_argument("--epochs", type=int, help="epochs of every fit (default: the configs')")
    parser.add_argument("--workers", type=int, help="processes drawing the stand-ins (default: one per CPU)")
    parser.add_argument("--alone", action="store_true", help="one fit per split, not a config's splits together")
    args, fit_options = parser.parse_known_args(argv)
    for name in ("splits", "epochs", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, not {getattr(args, name)}")
    if not args.scale > 0:
        parser.error(f"--scale must be above 0, not {args.scale}")
    args.workdir = args.workdir.resolve()
    return args, fit_options


def use_hub_cache(args: argparse.Namespace) -> None:
    """With random towers, the configs' hub ids resolve offline to DIR/hub."""
    if args.clip == "random":
        os.environ["HF_HUB_CACHE"] = str(args.workdir / "hub")
        os.environ["HF_HUB_OFFLINE"] = "1"


if __name__ == "__main__":
    # Before the imports below: huggingface_hub (which Lightning imports) reads both variables once, when imported.
    use_hub_cache(parse_args(sys.argv[1:])[0])

import torch  # noqa: E402
import yaml  # noqa: E402
from jsonargparse import Namespace  # noqa: E402
from lightning.pytorch.profilers import Profiler  # noqa: E402
from standins import RELEASE_IMAGES, STANDIN_FOLDERS, StandIns, build_random_hub_cache, make_standins  # noqa: E402

from mst_clipiqa.cli.benchmark import Benchmark, RunResult, markdown_table  # noqa: E402
from mst_clipiqa.demo.tiny_clip import build_tiny_pair  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
HEADS = {"template": "A", "prompt": "B"}
PHASES = ("data_seconds", "train_seconds")
"""What `PhaseProfiler` sums per run."""
PROJECTION = (
    "Real size, linearly: each phase that grows with the data times its benchmark's real image count over its "
    "stand-in's; building the towers and the runs' start-up do not grow. Nor do training's costs per epoch "
    "(validation, checkpoints), so at small scales its projection is an upper bound."
)
COUNTERS = ("images_decoded", "images_encoded", "images_cached", "prompts_encoded", "prompts_cached")
"""What the feature cache counts per run (`mst_clipiqa.data.features.FeatureStats`)."""


@dataclass
class Cell:
    """One config of the table: a benchmark, a target and a head, over the protocol's splits."""

    config: Path
    source: str
    variant: str
    target: str
    protocol: str
    n_splits: int
    results: list[RunResult] = field(default_factory=list)
    """The runner's result of every split."""
    phases: list[dict[str, float]] = field(default_factory=list)
    """Per run: the seconds of each of `PHASES`."""
    wall: float = 0.0

    @property
    def name(self) -> str:
        return self.config.stem

    def median(self, metric: str) -> float:
        return statistics.median(result.metrics[metric] for result in self.results)

    def phase(self, key: str) -> float:
        """Seconds of a profiled phase, summed over the runs."""
        return sum(run.get(key, 0.0) for run in self.phases)

    def counter(self, key: str) -> float:
        """A feature cache counter or timer, summed over the runs."""
        return sum(result.cache.get(key, 0) for result in self.results)


def table_configs(benchmarks: list[str]) -> list[Cell]:
    """The configs of experiments/ for `benchmarks`, in their order: quality first, head A before head B."""
    cells = []
    for source in benchmarks:
        for path in sorted(EXPERIMENTS.glob(f"{PREFIXES[source]}_*.yaml")):
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
            data, variant = config["data"], config["model"]["net"]["variant"]
            if data["source"] != source:
                raise ValueError(f"{path}: data.source is {data['source']!r}, not {source!r}")
            n_splits = data.get("folds", 5) if data["protocol"] == "kfold" else data.get("n_splits", 10)
            cells.append(Cell(path, source, variant, data["target"], data["protocol"], n_splits))
    heads = list(HEADS)
    return sorted(cells, key=lambda c: (benchmarks.index(c.source), c.target != "quality", heads.index(c.variant)))


# ---- running ---------------------------------------------------------------------------------------------------------


class PhaseProfiler(Profiler):
    """Sums the seconds of the data module's setup and dataloader hooks, and of the training epochs, of one run.

    Each run's Trainer builds its own from the class path in the run's config (an object there could not be written
    to the run's config.yaml), so every instance keeps its sums in `PhaseProfiler.runs`, in the order runs start.
    """

    runs: ClassVar[list[dict[str, float]]] = []

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = {}
        self.runs.append(self.seconds)
        self._started: dict[str, float] = {}

    def start(self, action_name: str) -> None:
        self._started[action_name] = time.perf_counter()

    def stop(self, action_name: str) -> None:
        seconds = time.perf_counter() - self._started.pop(action_name)
        hook = action_name.startswith("[LightningDataModule]")
        if action_name == "run_training_epoch":
            phase = "train_seconds"
        elif hook and (action_name.endswith(".setup") or action_name.endswith("_dataloader")):
            phase = "data_seconds"
        else:
            return
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


class ProfiledBenchmark(Benchmark):
    """The benchmark runner, the Trainer of every run profiled by a `PhaseProfiler`."""

    def _configure(self, config: Namespace) -> None:
        super()._configure(config)
        config.trainer.profiler = Namespace(class_path=f"{PhaseProfiler.__module__}.{PhaseProfiler.__qualname__}")


@dataclass
class Prepared:
    """The towers and the stand-ins, and what they cost."""

    towers_seconds: float
    standins_seconds: float
    standins: StandIns
    clip_options: list[str]
    """Fit options that point the configs at the towers (none where they load the configs' ids)."""


def prepare(args: argparse.Namespace) -> Prepared:
    """Build (or reuse) the towers and the stand-ins."""
    began = time.perf_counter()
    clip_options = []
    if args.clip == "random":
        build_random_hub_cache(args.workdir / "hub")
    elif args.clip == "tiny":
        coarse, fine = build_tiny_pair(args.workdir / "tiny-clip")
        clip_options = ["--model.net.coarse_encoder", str(coarse), "--model.net.fine_encoder", str(fine)]
    towers = time.perf_counter() - began
    began = time.perf_counter()
    standins = make_standins(args.workdir / "data", args.benchmarks, scale=args.scale, workers=args.workers)
    return Prepared(towers, time.perf_counter() - began, standins, clip_options)


def run(cells: list[Cell], prepared: Prepared, args: argparse.Namespace, fit_options: list[str]) -> None:
    """Every config through the benchmark runner, one feature cache for all; fills in the cells."""
    for cell in cells:
        fit_args = [
            "--config", str(cell.config),
            "--data.root", str(prepared.standins.roots[cell.source]),
            "--data.cache_dir", str(args.workdir / "features"),
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
            *prepared.clip_options,
            *(["--trainer.max_epochs", str(args.epochs)] if args.epochs else []),
            *fit_options,
        ]  # fmt: skip
        official = cell.protocol == "official"
        benchmark = ProfiledBenchmark(
            fit_args,
            splits=None if official or args.splits is None else min(args.splits, cell.n_splits),
            output=args.workdir / "runs" / cell.name,
            name=cell.name,
            together=not args.alone,
        )
        first, began = len(PhaseProfiler.runs), time.perf_counter()
        cell.results = benchmark.run()
        cell.wall = time.perf_counter() - began
        cell.phases = PhaseProfiler.runs[first:]


# ---- reporting -------------------------------------------------------------------------------------------------------


def cell_rows(cells: list[Cell]) -> list[dict[str, Any]]:
    """One row per config: metrics over its splits, phase seconds and cache counters."""
    rows = []
    for cell in cells:
        phases = {key: cell.phase(key) for key in PHASES}
        rows.append(
            {
                "benchmark": STANDIN_FOLDERS[cell.source],
                "target": cell.target,
                "head": HEADS[cell.variant],
                "config": cell.name,
                "protocol": cell.protocol,
                "splits": len(cell.results),
                "median_srcc": cell.median("srcc"),
                "median_plcc": cell.median("plcc"),
                "mean_srcc": statistics.fmean(r.metrics["srcc"] for r in cell.results),
                "mean_plcc": statistics.fmean(r.metrics["plcc"] for r in cell.results),
                "wall_seconds": cell.wall,
                **phases,
                "decode_wait_seconds": cell.counter("decode_seconds"),
                "tower_seconds": cell.counter("tower_seconds"),
                "other_seconds": cell.wall - sum(phases.values()),
                **{key: int(cell.counter(key)) for key in COUNTERS},
            }
        )
    return rows


def run_rows(cells: list[Cell]) -> list[dict[str, Any]]:
    """One row per split: its test metrics, and its fit's profiled phases and cache counters (on the first split's
    row where the splits trained together)."""
    return [
        {
            "config": cell.name,
            "split": result.split,
            "srcc": result.metrics["srcc"],
            "plcc": result.metrics["plcc"],
            **{key: phases.get(key, 0.0) for key in PHASES},
            "decode_wait_seconds": result.cache.get("decode_seconds", 0.0),
            "tower_seconds": result.cache.get("tower_seconds", 0.0),
            **{key: result.cache.get(key, 0) for key in COUNTERS},
        }
        for cell in cells
        for result, phases in zip(cell.results, cell.phases + [{}] * (len(cell.results) - len(cell.phases)))
    ]


def results_table(cells: list[Cell]) -> str:
    """Median SRCC / PLCC: a row per benchmark and target, a column per head."""
    rows: dict[tuple[str, str], dict[str, Cell]] = defaultdict(dict)
    for cell in cells:
        rows[(cell.source, cell.target)][cell.variant] = cell
    lines = [
        "| benchmark | target | protocol | head A: SRCC / PLCC | head B: SRCC / PLCC |",
        "|---|---|---|---|---|",
    ]
    for (source, target), heads in rows.items():
        splits = len(next(iter(heads.values())).results)
        protocol = f"{next(iter(heads.values())).protocol}, {splits} split{'s' if splits > 1 else ''}"
        shown = [f"{heads[v].median('srcc'):.4f} / {heads[v].median('plcc'):.4f}" if v in heads else "–" for v in HEADS]
        lines.append(f"| {STANDIN_FOLDERS[source]} | {target} | {protocol} | {' | '.join(shown)} |")
    return "\n".join(lines)


def phase_table(cells: list[Cell], prepared: Prepared) -> str:
    """Where the time went, summed over the configs, and projected linearly to the benchmarks' real size: each phase
    that grows with the data times the benchmark's real image count over its stand-in's."""
    images = prepared.standins.images
    growth = {source: RELEASE_IMAGES[source] / count for source, count in images.items()}
    rows = cell_rows(cells)

    def total(key: str) -> tuple[float, float]:
        """(seconds, seconds at real size) of a column of `rows`."""
        pairs = [(row[key], growth[cell.source]) for row, cell in zip(rows, cells)]
        return sum(s for s, _ in pairs), sum(s * g for s, g in pairs)

    def count(key: str) -> int:
        return sum(row[key] for row in rows)

    data, wait, towers = total("data_seconds"), total("decode_wait_seconds"), total("tower_seconds")
    drawn, drawing = prepared.standins.drawn, prepared.standins_seconds
    real = sum(RELEASE_IMAGES[source] for source in images) / sum(images.values())
    phases = [
        ("build the towers", (prepared.towers_seconds,) * 2),
        (f"draw the stand-ins ({drawn} images, {drawn / drawing:.1f} images/s)" if drawn else "stand-ins: reused",
         (drawing, drawing * real)),
        ("data: read each release, hash its files, read and write the cache",
         tuple(d - w - t for d, w, t in zip(data, wait, towers))),
        (f"encode: waiting for decoded images ({count('images_decoded')} decoded)", wait),
        (f"encode: towers ({count('images_encoded')} images, {count('prompts_encoded')} prompts)", towers),
        ("train: epochs with validation and checkpoints", total("train_seconds")),
        ("other: start-up of each run (loading the towers), tests", (total("other_seconds")[0],) * 2),
    ]  # fmt: skip
    overall = sum(seconds for _, (seconds, _) in phases)
    lines = ["| phase | seconds | share | at real size (linear) |", "|---|---|---|---|"]
    lines += [f"| {what} | {s:.1f} | {s / overall:.0%} | {full:.1f} |" for what, (s, full) in phases]
    lines.append(f"| total | {overall:.1f} | 100% | {sum(full for _, (_, full) in phases):.1f} |")
    return "\n".join(lines)


def report(cells: list[Cell], prepared: Prepared, args: argparse.Namespace) -> str:
    """Write paper_table.md, paper_table.csv and paper_table_runs.csv to the work folder; returns the markdown."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    images = ", ".join(f"{STANDIN_FOLDERS[source]} {n}" for source, n in prepared.standins.images.items())
    epochs = args.epochs or "the configs'"
    rows = cell_rows(cells)
    text = "\n\n".join(
        [
            "# The paper's table on stand-ins",
            f"Scale {args.scale:g} of the benchmarks (images: {images}); towers: {args.clip}; splits: "
            f"{args.splits or 'all'}; epochs: {epochs}. Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
            f"{device}.",
            "## Median SRCC / PLCC over the splits\n\n" + results_table(cells),
            "## Where the time went\n\n" + phase_table(cells, prepared) + "\n\n" + PROJECTION,
            "## Per config\n\n" + markdown_table(rows, list(rows[0])),
        ]
    )
    (args.workdir / "paper_table.md").write_text(text + "\n", encoding="utf-8")
    for name, table in (("paper_table.csv", rows), ("paper_table_runs.csv", run_rows(cells))):
        with (args.workdir / name).open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    return text


def main(argv: list[str] | None = None) -> None:
    args, fit_options = parse_args(argv)
    cells = table_configs(args.benchmarks)
    prepared = prepare(args)
    run(cells, prepared, args, fit_options)
    print(report(cells, prepared, args))
    print(f"\nReports in {args.workdir}")


if __name__ == "__main__":
    main()
