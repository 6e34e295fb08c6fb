"""What the cluster and fault tests share: the CLI arguments of a small run, launching it, and reading its results.

The run is the packaged demo config on the `demo_data` fixture (80 images) with tiny encoders, split so that the
evaluation parts have odd sizes (56 train, 11 val, 13 test): on 2 ranks a padding sampler would repeat a sample.
"""

from __future__ import annotations

import csv
import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mst_clipiqa.demo.run import DEMO_CONFIG

SCRIPTS = Path(__file__).parent
TRAIN_ROWS, VAL_ROWS, TEST_ROWS = 56, 11, 13
BATCH_SIZE = 16
STEPS_PER_EPOCH = math.ceil(TRAIN_ROWS / BATCH_SIZE)
METRICS = ("srcc", "plcc", "krcc", "rmse")


def cli_args(demo_data: str, clip: tuple[str, str], run_dir: Path, *extra: str, epochs: int = 3) -> list[str]:
    """Arguments after the subcommand: the demo config, this run's folder, and `extra` last (they win)."""
    return [
        "--config", str(DEMO_CONFIG),
        "--data.root", demo_data,
        "--data.protocol", "random",
        "--data.train_fraction", "0.8375",  # 67 of 80 rows in train+val, 13 in test
        "--data.val_fraction", "0.165",  # 11 of the 67 validate
        "--data.batch_size", str(BATCH_SIZE),
        "--data.cache_dir", str(Path(demo_data).parent / "feature-cache"),  # one cache, as a user's runs share
        "--model.net.coarse_encoder", clip[0],
        "--model.net.fine_encoder", clip[1],
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger.init_args.save_dir", str(run_dir),
        "--trainer.max_epochs", str(epochs),
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child run: offline, one thread per process (two ranks share two cores), and
    `scripts.runs` importable as in the tests. It starts its own W&B service, as a command in a new shell does: the
    test process's (WANDB_SERVICE, set by an earlier in-process run) would still hold a killed child's run id."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
    env.pop("WANDB_SERVICE", None)
    path = os.pathsep.join(filter(None, [str(SCRIPTS.parent), env.get("PYTHONPATH")]))
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def free_port() -> int:
    """A TCP port that no process listens on, now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], env: dict[str, str] | None = None, timeout: float = 240) -> str:
    """Run a command to completion; fail the test, with the end of its output, unless it exits with 0.

    The command gets its own process group, so that on timeout the ranks it started go down with it.
    """
    process = subprocess.Popen(
        command, env=env or subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{command[:4]} ran past {timeout} s:\n{output[-4000:]}")
    if process.returncode != 0:
        pytest.fail(f"{command[:4]} exited with {process.returncode}:\n{output[-4000:]}")
    return output


@contextmanager
def standing_still(
    marker: Path, step: int, cli: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen]:
    """Run `fit_and_stand_still.py`, a fit that stops still after optimizer step `step` and writes `marker`; killed
    on leaving the block if it still runs. Its output goes to `log`: a pipe nobody reads could fill and block it.
    """
    command = [sys.executable, str(SCRIPTS / "fit_and_stand_still.py"), str(marker), str(step), *cli]
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=60)


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Poll until `condition()` holds; fail, with the end of `log`, if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            why = f"exited with {process.returncode}" if process.returncode is not None else f"ran {timeout} s"
            pytest.fail(f"the run {why} before the awaited moment:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def logged_metrics(run_dir: Path) -> list[dict[str, float]]:
    """Every row of every metrics.csv under `run_dir`, oldest logger version first, empty cells left out."""
    rows = []
    for path in sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime):
        with path.open() as f:
            rows += [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return rows


@contextmanager
def one_thread() -> Iterator[None]:
    """Compute on one torch thread meanwhile, as the runs `subprocess_env` starts do: float sums taken over another
    number of threads differ in the last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def in_process(subcommand: str, args: list[str]):
    """Run the CLI in this process and return it (its trainer, model and data module stay readable)."""
    from mst_clipiqa.cli.trainer import MSTCLIPIQACLI

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return MSTCLIPIQACLI(args=[subcommand, *args])


def embedding_rows(n: int, dim: int = 64) -> list[dict]:
    """Rows as the feature cache serves them: both streams' embeddings (width of the tiny towers), the prompt's token
    states and mask, and MOS on a 0-5 scale."""
    g = torch.Generator().manual_seed(0)
    return [
        {"coarse_embeds": torch.randn(dim, generator=g), "fine_embeds": torch.randn(dim, generator=g),
         "prompt_states": torch.randn(6, dim, generator=g), "prompt_mask": torch.arange(6) < 3 + i % 4,
         "mos": torch.rand((), generator=g) * 5, "index": i}
        for i in range(n)
    ]  # fmt: skip
