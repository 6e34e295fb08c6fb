"""Work that runs beside the tests: a command, or a notebook's kernel, that needs only the session's fixtures.

Such work spends most of its time in a process of its own, on one core, importing torch and Lightning, while the
tests, computing on one thread, leave the other core free. So it starts at the start of the session (the fixtures
named ``*_beside`` in conftest.py), one piece at a time, and the test that checks a piece waits for it to finish.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest


class Beside:
    """One lane of work beside the tests, in the order it is given."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="beside")
        self._running: set[subprocess.Popen] = set()

    def call(self, function: Callable[..., Any], *args: Any) -> Future:
        """``function(*args)`` in the lane; its result, or its exception, comes out of the future."""
        return self._pool.submit(function, *args)

    def run(
        self, command: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300
    ) -> Future[subprocess.CompletedProcess]:
        """`command` in the lane, to its end: its exit status, stdout and stderr. Past `timeout` seconds it is killed
        with the processes it started, and its exit status is -9."""
        return self._pool.submit(self.finish, command, env, cwd, timeout)

    def finish(
        self, command: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        """As `run`, in the calling thread: for work in the lane that builds its command when it starts."""
        process = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        self._running.add(process)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        finally:
            self._running.discard(process)
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

    def close(self) -> None:
        """Drop the work not started, and kill the commands still running (a session cut short leaves some)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in list(self._running):
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def output_of(result: subprocess.CompletedProcess) -> str:
    """What a command run in the lane printed (its stdout, then its stderr); fails the test, with the end of it,
    unless the command exited with 0."""
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"{result.args[:4]} exited with {result.returncode}:\n{output[-4000:]}")
    return output
