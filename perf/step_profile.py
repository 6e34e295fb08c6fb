"""Where a fit's time goes once the feature cache holds every image: the head's training steps, validation,
checkpoints, and the rest, per step and per epoch, from Lightning's own timed actions.

    python perf/step_profile.py WORKDIR [--scenes 600] [--epochs 30] [--config experiments/agiqa3k_template.yaml]

A demo data set of 5 x `--scenes` images (600 scenes: 3,000 images, AGIQA-3K's size) in AGIQA-3K's layout, tiny
random towers that project to 512 (the width of the real ViT-B embeddings, so the heads are the real ones), and the
config's protocol (AGIQA-3K: prompt-disjoint, 80/20, batch 16). A first fit fills the cache; the second, profiled,
reads every embedding from it, so what it measures is the head training loop alone. Then the same fit without
validation and checkpoints, and one with validation every `--every` epochs, in the same process.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.profilers import SimpleProfiler

from mst_clipiqa.cli.trainer import MSTCLIPIQACLI
from mst_clipiqa.demo.synthetic import make_demo_dataset
from mst_clipiqa.demo.tiny_clip import build_tiny_pair

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {
    "training steps (forward, loss, backward)": ("[Strategy]SingleDeviceStrategy.training_step", "[Strategy]",),
    "optimizer step": ("optimizer_step",),
    "validation (incl. metrics)": ("[_EvaluationLoop].val_next", "[Strategy]SingleDeviceStrategy.validation_step"),
    "checkpoint writes": ("[Callback]ResumingModelCheckpoint",),
}


def fit(args: argparse.Namespace, extra: list[str], checkpoints: bool = True) -> tuple[float, SimpleProfiler, int]:
    """One fit (without the checkpoint callback unless `checkpoints`); returns its seconds, its profiler and its
    optimizer steps."""
    cli = MSTCLIPIQACLI(
        args=[
            "--config", str(args.config), "--data.root", str(args.data),
            "--model.net.coarse_encoder", str(args.towers[0]), "--model.net.fine_encoder", str(args.towers[1]),
            "--data.cache_dir", str(args.workdir / "features"), "--data.num_workers", "0",
            "--trainer.max_epochs", str(args.epochs), "--trainer.accelerator", "cpu",
            "--trainer.default_root_dir", str(args.workdir / "runs"), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.logger", "false", *extra,
        ],  # fmt: skip
        run=False,
    )
    if not checkpoints:
        cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, ModelCheckpoint)]
    profiler = SimpleProfiler()
    cli.trainer.profiler = profiler
    began = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return time.perf_counter() - began, profiler, cli.trainer.global_step


def summary(name: str, seconds: float, profiler: SimpleProfiler, steps: int, epochs: int) -> None:
    durations = profiler.recorded_durations
    total = {action: sum(times) for action, times in durations.items()}
    print(f"\n## {name}: {seconds:.1f} s, {steps} optimizer steps over {epochs} epochs "
          f"({seconds / steps * 1000:.2f} ms per step, all included)\n")  # fmt: skip
    print("| action (Lightning's name) | calls | seconds | ms per call | share of the fit |")
    print("|---|---|---|---|---|")
    shown = sorted(total, key=total.get, reverse=True)[:18]
    for action in shown:
        calls = len(durations[action])
        print(f"| {action} | {calls} | {total[action]:.2f} | {total[action] / calls * 1000:.2f} | "
              f"{total[action] / seconds:.0%} |")  # fmt: skip
    grouped = defaultdict(float)
    for action, value in total.items():
        for group, prefixes in GROUPS.items():
            if action.startswith(prefixes[0]) or (len(prefixes) > 1 and action == prefixes[1]):
                grouped[group] += value
    print()
    for group, value in grouped.items():
        print(f"- {group}: {value:.2f} s ({value / seconds:.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--scenes", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--every", type=int, default=5, help="validation every N epochs in the last fit")
    parser.add_argument("--config", type=Path, default=ROOT / "experiments" / "agiqa3k_template.yaml")
    args = parser.parse_args()
    sys.argv[1:] = []  # the fits' options are LightningCLI's args
    args.workdir = args.workdir.resolve()
    args.towers = build_tiny_pair(args.workdir / "towers", projection_dim=512)
    args.data = make_demo_dataset(args.workdir / "agiqa3k-demo", n_scenes=args.scenes)

    seconds, _, _ = fit(args, ["--trainer.max_epochs", "1"])
    print(f"first fit (1 epoch, fills the cache): {seconds:.1f} s")
    seconds, profiler, steps = fit(args, [])
    summary("warm cache, as configured", seconds, profiler, steps, args.epochs)
    seconds, profiler, steps = fit(args, ["--trainer.limit_val_batches", "0"], checkpoints=False)
    summary("warm cache, no validation, no checkpoints", seconds, profiler, steps, args.epochs)
    seconds, profiler, steps = fit(args, ["--trainer.check_val_every_n_epoch", str(args.every)])
    summary(f"warm cache, validation every {args.every} epochs", seconds, profiler, steps, args.epochs)


if __name__ == "__main__":
    main()
