"""`mst-clipiqa fit --help`: seconds to the help, rendered (an empty user cache) and read back (the same cache), the
median of N runs of each, back to back. The other commands' help is timed beside, for scale.

    python perf/help_time.py            # 3 runs of each
    python perf/help_time.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONSOLE = shutil.which("mst-clipiqa", path=str(Path(sys.executable).parent)) or "mst-clipiqa"


def seconds(args: list[str], cache: str) -> float:
    start = time.perf_counter()
    subprocess.run([CONSOLE, *args], env=dict(os.environ, XDG_CACHE_HOME=cache), capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    rendered, read_back, score, overview, export = [], [], [], [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as cache:
            rendered.append(seconds(["fit", "--help"], cache))
            read_back.append(seconds(["fit", "--help"], cache))
            score.append(seconds(["score", "--help"], cache))
            overview.append(seconds(["--help"], cache))
            export.append(seconds(["export", "--help"], cache))
    print(f"load average {os.getloadavg()[0]:.2f}; median of {runs}:")
    timed = {
        "fit --help, rendered": rendered,
        "fit --help, read back": read_back,
        "score --help": score,
        "export --help": export,
        "--help": overview,
    }
    for name, times in timed.items():
        print(f"  {name + ':':22} {statistics.median(times):6.2f} s  ({', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
