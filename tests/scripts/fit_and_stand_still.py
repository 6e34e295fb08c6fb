"""`mst-clipiqa fit ARGS` that stands still after a given optimizer step, so a test can kill or signal it there.

    python fit_and_stand_still.py MARKER STEP ARGS...

Once the training loop has finished global step STEP (and whatever checkpoints came before it are on disk), the run
writes MARKER and sleeps, up to ten minutes, inside the training loop, where a test sends SIGKILL or SIGUSR1 to it.
Standing still makes the moment of the fault deterministic; the fault itself is real.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning as L

from mst_clipiqa.cli.trainer import MSTCLIPIQACLI


class StandStill(L.Callback):
    def __init__(self, marker: Path, step: int) -> None:
        self.marker, self.step = marker, step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text(str(trainer.current_epoch))
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                time.sleep(0.05)  # signal handlers run between these sleeps


class StandingStillCLI(MSTCLIPIQACLI):
    def before_fit(self) -> None:
        super().before_fit()
        self.trainer.callbacks.append(StandStill(Path(sys.argv[1]), int(sys.argv[2])))


if __name__ == "__main__":
    StandingStillCLI(args=["fit", *sys.argv[3:]])
