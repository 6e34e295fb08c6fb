"""`mst-clipiqa score` on a CPU picks torch's thread count from the cores idle when it starts: one thread on a loaded
machine, where threads that wait for each other at every operation slow the towers down (docs/PERFORMANCE.md), and
torch's own count on idle cores; an OMP_NUM_THREADS the user sets is left alone."""

from __future__ import annotations

import os

import pytest
import torch

import mst_clipiqa.scoring.scorer as scorer
from mst_clipiqa.cli.commands import main
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule


@pytest.fixture
def threads_seen(monkeypatch) -> list[int]:
    """The thread counts the predict steps of the scoring jobs ran with."""
    seen: list[int] = []
    real = MSTCLIPIQAModule.predict_step

    def recording(step, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(step, *args, **kwargs)

    monkeypatch.setattr(MSTCLIPIQAModule, "predict_step", recording)
    return seen


@pytest.mark.parametrize(("idle", "expected"), [(0.1, 1), (64.0, 2)], ids=["loaded", "idle"])
def test_score_takes_threads_from_the_idle_cores_and_gives_them_back(
    idle, expected, saved_models, demo_data, tmp_path, monkeypatch, threads_seen
):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(scorer, "idle_cores", lambda: idle)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        main(["score", str(saved_models["template"][1]), str(os.path.join(demo_data, "images")), "--out",
              str(tmp_path / "scores.csv"), "--accelerator", "cpu", "--batch_size", "40"])  # fmt: skip
        assert threads_seen and set(threads_seen) == {expected}
        assert torch.get_num_threads() == 2  # the caller's count again
    finally:
        torch.set_num_threads(before)


def test_a_thread_count_the_user_sets_is_kept_and_ranks_share_the_idle_cores(monkeypatch):
    assert 0.0 <= scorer.idle_cores(0.05) <= os.cpu_count()  # this machine's, read from /proc/stat
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert scorer.cpu_threads(1) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(scorer, "idle_cores", lambda: 2.0)
    torch_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert scorer.cpu_threads(1) == 2 and scorer.cpu_threads(2) == 1
    finally:
        torch.set_num_threads(torch_threads)
