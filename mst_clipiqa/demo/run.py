"""`mst-clipiqa demo` (options: `mst_clipiqa.cli.commands.demo`): the whole pipeline offline, in minutes, on a CPU.

Draws a small data set of scenes at several distortion levels (AGIQA-3K's official layout), saves two tiny random
CLIP checkpoints, then fits and tests MST-CLIPIQA with the packaged `configs/demo.yaml`. The encoders are random, so
the printed SRCC/PLCC only show that every stage runs and that the head learns; they say nothing of real quality.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from mst_clipiqa.demo.synthetic import make_demo_dataset
from mst_clipiqa.demo.tiny_clip import build_tiny_pair

DEMO_CONFIG = files("mst_clipiqa.demo") / "configs" / "demo.yaml"


def prepare(workdir: str | Path, n_scenes: int = 40) -> dict[str, str]:
    """Create (or reuse) the demo data and tiny encoders; returns the CLI overrides pointing at them."""
    workdir = Path(workdir)
    root = make_demo_dataset(workdir / "agiqa3k-demo", n_scenes=n_scenes)
    coarse, fine = build_tiny_pair(workdir)
    return {
        "--data.root": str(root),
        "--model.net.coarse_encoder": str(coarse),
        "--model.net.fine_encoder": str(fine),
        "--trainer.default_root_dir": str(workdir / "runs"),
        "--trainer.logger.init_args.save_dir": str(workdir / "runs"),
    }


def run(workdir: str | Path = "demo_run", extra: list[str] | None = None, n_scenes: int = 40) -> dict[str, float]:
    """Fit on the demo's training split, then test the best checkpoint; returns the test metrics."""
    from mst_clipiqa.cli.trainer import MSTCLIPIQACLI

    overrides = [item for pair in prepare(workdir, n_scenes).items() for item in pair]
    cli = MSTCLIPIQACLI(args=["fit", "--config", str(DEMO_CONFIG), *overrides, *(extra or [])])
    (results,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    return results
