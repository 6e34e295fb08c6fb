"""Peak memory of `mst-clipiqa score` as the input grows: the same command on N1, N2, ... images, each a process of
its own, its resident memory (with its loader workers) sampled while it runs.

    python perf/score_memory.py WORKDIR --images 1000 10000 [--towers tiny|real] [--num_workers 1]

Images come from the demo generator (5 per scene, 256-320 px, PNG), written once to WORKDIR/demo and listed in a
.txt file per size; the model is a random-weight one of the chosen towers (`tiny`: the tests' tiny towers; `real`:
the ViT-B/32 and B/16 shapes, as in perf/score_engine.py). Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc (0 once it has gone)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--towers", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--num_workers", type=int, default=1)
    args = parser.parse_args()
    work = args.workdir.resolve()
    env = dict(os.environ, HF_HUB_CACHE=str(work / "hub"), HF_HUB_OFFLINE="1")
    os.environ.update(env)

    from score_engine import random_model  # perf/, this script's folder

    from mst_clipiqa.demo.synthetic import make_demo_dataset

    model = random_model(work, args.towers)
    began = time.perf_counter()
    images = sorted((make_demo_dataset(work / "demo", n_scenes=-(-max(args.images) // 5)) / "images").iterdir())
    print(f"{len(images)} demo images ready in {time.perf_counter() - began:.0f} s", flush=True)

    print("| images | seconds | images/s | peak RSS, score process and workers (MiB) | peak RSS, largest process "
          "(MiB) |")
    print("|---|---|---|---|---|")
    for count in args.images:
        listing = work / f"images-{count}.txt"
        listing.write_text("".join(f"{path}\n" for path in images[:count]))
        out = work / f"scores-{count}.parquet"
        out.unlink(missing_ok=True)
        command = [sys.executable, "-m", "mst_clipiqa", "score", str(model), str(listing), "--out", str(out),
                   "--accelerator", "cpu", "--num_workers", str(args.num_workers)]  # fmt: skip
        began, peak = time.perf_counter(), 0
        log = work / f"score-{count}.log"  # a file, not a pipe: a full pipe would stop the command's progress bar
        with log.open("w") as stderr:
            child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
            while child.poll() is None:
                peak = max(peak, tree_rss(child.pid))
                time.sleep(0.2)
        seconds = time.perf_counter() - began
        if child.returncode:
            sys.exit(f"score failed on {count} images:\n{log.read_text()[-3000:]}")
        largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest so far, in KiB
        print(f"| {count} | {seconds:.0f} | {count / seconds:.1f} | {peak / 2**20:.0f} | {largest:.0f} |", flush=True)


if __name__ == "__main__":
    main()
