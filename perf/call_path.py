"""Which of the package's files one image's `score` and one training step run through, in the order they are entered.

    python perf/call_path.py WORKDIR

Traces (`sys.setprofile`, the main process; the loaders run in it here, `num_workers=0`) every call into a function of
`mst_clipiqa/`, and prints, for each path, the package files entered in order (a file entered again after others is
listed again: the path doubled back to it), then the distinct files and the number of those returns.

- score: `score_files` of one PNG with a saved model of tiny random towers, from the call to the file written (the
  model's loading included);
- fit step: one training step of `MSTCLIPIQAModule` on cached embeddings, from the batch leaving the loader to the
  optimizer's step (`on_train_batch_start` to `on_train_batch_end`, plus the batch's `__getitems__`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mst_clipiqa

PACKAGE = Path(mst_clipiqa.__file__).resolve().parent


class Path_:
    """The package files entered, in order, collapsing repeats of the same file."""

    def __init__(self) -> None:
        self.files: list[str] = []

    def __call__(self, frame, event, arg) -> None:
        if event != "call":
            return
        file = Path(frame.f_code.co_filename)
        if file.is_relative_to(PACKAGE):
            name = str(file.relative_to(PACKAGE))
            if not self.files or self.files[-1] != name:
                self.files.append(name)

    def report(self, title: str) -> None:
        distinct = list(dict.fromkeys(self.files))
        print(f"{title}: {len(distinct)} files, entered {len(self.files)} times ({len(self.files) - len(distinct)} "
              f"returns to a file left before)")  # fmt: skip
        print("  " + " -> ".join(self.files))


def score_path(work: Path) -> None:
    import numpy as np
    from PIL import Image

    from mst_clipiqa.demo.tiny_clip import build_tiny_pair
    from mst_clipiqa.hub.pretrained import save_pretrained
    from mst_clipiqa.model import ModelConfig
    from mst_clipiqa.scoring.scorer import score_files
    from mst_clipiqa.training.lit_module import MSTCLIPIQAModule

    coarse, fine = build_tiny_pair(work / "tiny")
    module = MSTCLIPIQAModule(net=ModelConfig(coarse_encoder=str(coarse), fine_encoder=str(fine)))
    module.net.set_mos_range(0.0, 5.0)
    model = save_pretrained(module, work / "model")
    image = work / "one.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    out = work / "scores.csv"
    out.unlink(missing_ok=True)
    trace = Path_()
    sys.setprofile(trace)
    try:
        score_files(model, [str(image)], out, accelerator="cpu", num_workers=0)
    finally:
        sys.setprofile(None)
    trace.report("score, one image")


def fit_step(work: Path) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from mst_clipiqa.data.datamodule import IQADataModule
    from mst_clipiqa.data.features import FeatureRows
    from mst_clipiqa.demo.synthetic import make_demo_dataset
    from mst_clipiqa.demo.tiny_clip import build_tiny_pair
    from mst_clipiqa.model import ModelConfig
    from mst_clipiqa.training.lit_module import MSTCLIPIQAModule

    coarse, fine = build_tiny_pair(work / "tiny")
    root = make_demo_dataset(work / "demo", n_scenes=8)
    trace = Path_()

    class Trace(Callback):
        def on_train_batch_start(self, *args) -> None:
            sys.setprofile(trace)

        def on_train_batch_end(self, *args) -> None:
            sys.setprofile(None)

    getitems = FeatureRows.__getitems__

    def traced(self, indices):
        sys.setprofile(trace)
        try:
            return getitems(self, indices)
        finally:
            sys.setprofile(None)

    FeatureRows.__getitems__ = traced
    module = MSTCLIPIQAModule(net=ModelConfig(coarse_encoder=str(coarse), fine_encoder=str(fine)))
    data = IQADataModule(source="agiqa-3k", root=str(root), num_workers=0, cache_dir=str(work / "cache"))
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[Trace()],
        default_root_dir=work,
    )
    trainer.fit(module, datamodule=data)
    FeatureRows.__getitems__ = getitems
    trace.report("fit, one training step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    score_path(args.workdir)
    fit_step(args.workdir)


if __name__ == "__main__":
    main()
