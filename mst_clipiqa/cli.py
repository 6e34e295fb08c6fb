"""Command line: `mst-clipiqa {fit,validate,test,predict}` (LightningCLI) plus demo, score, export and benchmark."""

from __future__ import annotations

import sys
from collections.abc import Callable


def demo_command(argv: list[str]) -> None:
    from mst_clipiqa.demo import main as demo_main

    demo_main(argv)


def score_command(argv: list[str]) -> None:
    from mst_clipiqa.scorer import main as score_main

    score_main(argv)


def export_command(argv: list[str]) -> None:
    from mst_clipiqa.pretrained import export_main

    export_main(argv)


def benchmark_command(argv: list[str]) -> None:
    from mst_clipiqa.benchmark import main as benchmark_main

    benchmark_main(argv)


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "demo": demo_command,
    "score": score_command,
    "export": export_command,
    "benchmark": benchmark_command,
}


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return
    from mst_clipiqa.trainer_cli import MSTCLIPIQACLI

    MSTCLIPIQACLI(args=args)


if __name__ == "__main__":
    main()
