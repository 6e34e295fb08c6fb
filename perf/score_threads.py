"""`mst-clipiqa score` of small images on the CPU under thread and worker settings, on a quiet machine and on one
loaded with busy loops, each run a process of its own, the settings interleaved so that the load of others falls
on all alike.

    python perf/score_threads.py WORKDIR --images 1500 --rounds 2 --load 0 2
    python perf/score_threads.py WORKDIR --before /path/to/older/checkout    # its default measured beside

Each run scores the same folder of `--images` noise PNGs (48-64 px) with a tiny-tower model (`tiny_clip`); the
figure is the run's wall time, model loading included. `--load N` starts N busy-loop processes for the runs of that
condition (each stops by itself after 20 minutes, and all are killed at the end of the condition).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS: dict[str, tuple[dict[str, str], list[str]]] = {
    "default": ({}, []),
    "OMP_NUM_THREADS=1": ({"OMP_NUM_THREADS": "1"}, []),
    "OMP_NUM_THREADS=2": ({"OMP_NUM_THREADS": "2"}, []),
    "OMP_NUM_THREADS=1, --num_workers 0": ({"OMP_NUM_THREADS": "1"}, ["--num_workers", "0"]),
    "OMP_NUM_THREADS=2, --num_workers 0": ({"OMP_NUM_THREADS": "2"}, ["--num_workers", "0"]),
    "OMP_NUM_THREADS=1, --num_workers 2": ({"OMP_NUM_THREADS": "1"}, ["--num_workers", "2"]),
}
"""Label → (environment, extra options). Without OMP_NUM_THREADS torch picks one thread per core, or the command
does."""
BUSY = "import time\nend = time.time() + 1200\nwhile time.time() < end: pass"


def make_inputs(work: Path, count: int) -> tuple[Path, Path]:
    """(a saved tiny-tower model, a folder of `count` small noise PNGs), made once in `work`."""
    import numpy as np
    from PIL import Image

    from mst_clipiqa.demo.tiny_clip import build_tiny_pair
    from mst_clipiqa.hub.pretrained import save_pretrained
    from mst_clipiqa.model import ModelConfig
    from mst_clipiqa.training.lit_module import MSTCLIPIQAModule

    model, folder = work / "model", work / f"images-{count}"
    if not model.exists():
        coarse, fine = build_tiny_pair(work / "tiny")
        module = MSTCLIPIQAModule(net=ModelConfig(coarse_encoder=str(coarse), fine_encoder=str(fine)))
        module.net.set_mos_range(0.0, 5.0)
        save_pretrained(module, model)
    if not folder.exists():
        folder.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(count):
            size = (48 + i % 17, 64 - i % 13, 3)
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return model, folder


def run(model: Path, folder: Path, out: Path, env: dict[str, str], options: list[str], code: str | None) -> float:
    """Seconds of one `mst-clipiqa score` process, the package imported from `code` (None: this one)."""
    environment = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    environment |= {"HF_HUB_OFFLINE": "1", **env}
    if code is not None:
        environment["PYTHONPATH"] = code
    command = [sys.executable, "-m", "mst_clipiqa", "score", str(model), str(folder), "--out", str(out),
               "--accelerator", "cpu", *options]  # fmt: skip
    out.unlink(missing_ok=True)  # score refuses to replace a finished file without --overwrite, which older code lacks
    start = time.perf_counter()
    subprocess.run(command, env=environment, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--load", type=int, nargs="+", default=[0, 2], help="busy loops of each condition")
    parser.add_argument("--before", help="a checkout of the package whose default is measured too")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, folder = make_inputs(args.workdir, args.images)
    cases = [(label, *SETTINGS[label], None) for label in args.settings]
    if args.before:
        cases.insert(0, ("default, before", {}, [], args.before))
    for load in args.load:
        busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
        try:
            times: dict[str, list[float]] = {label: [] for label, *_ in cases}
            began = os.getloadavg()
            for _ in range(args.rounds):
                for label, env, options, code in cases:
                    times[label].append(run(model, folder, args.workdir / "scores.csv", env, options, code))
            ended = os.getloadavg()
        finally:
            for process in busy:
                process.kill()
                process.wait()
        print(f"\n{load} busy loops; load average (1, 5, 15 min) {began} at the start, {ended} at the end")
        best = min(statistics.median(seconds) for seconds in times.values())
        for label, seconds in times.items():
            median = statistics.median(seconds)
            runs = ", ".join(f"{s:.1f}" for s in seconds)
            print(f"| {label} | {median:.1f} s ({runs}) | {median / best:.2f} x the best |")


if __name__ == "__main__":
    main()
