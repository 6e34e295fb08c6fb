"""Gloo process groups for the tests: `run_ranks` starts one, and the functions here are what its processes run;
rank 0 writes the results to a file the test reads."""

from __future__ import annotations

import json
from collections.abc import Callable
from multiprocessing import forkserver

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PRELOADED = [__name__, "mst_clipiqa.metrics", "mst_clipiqa.data.samplers", "mst_clipiqa.training.callbacks"]
"""What the fork server imports once for every group of the session: the modules of the functions below."""


def start_fork_server() -> None:
    """Start the fork server now: it imports `PRELOADED` in the background, and the first group need not wait."""
    mp.set_forkserver_preload(PRELOADED)
    forkserver.ensure_running()


def run_ranks(function: Callable[..., None], args: tuple, nprocs: int) -> None:
    """Run ``function(rank, *args)`` in `nprocs` processes, and wait for them; fails if any of them does.

    The processes fork from multiprocessing's fork server, a process started clean on first use: a fork of this one
    could deadlock on a lock that one of its threads (torch's, W&B's) held, and a spawned process would spend seconds
    importing torch and the package again, each time.
    """
    mp.set_forkserver_preload(PRELOADED)  # takes effect when the server starts
    mp.start_processes(function, args=args, nprocs=nprocs, start_method="forkserver")


def mos_like(n: int, seed: int, ties: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions loosely related to MOS on a 0-100 scale; with ties, both sides are rounded coarsely."""
    g = torch.Generator().manual_seed(seed)
    target = 50 + 12 * torch.randn(n, generator=g)
    preds = 0.6 * target + 8 * torch.randn(n, generator=g) + 15
    if ties:
        preds, target = (preds / 5).round() * 5, (target / 10).round() * 10
    return preds, target


def metrics_of_shards(rank: int, world_size: int, init_file: str, out_file: str, sizes: list[int]) -> None:
    """For each n in `sizes`: `make_metrics` of the shard of n tied bf16 predictions (`mos_like(n, 7, ties=True)`)
    that `EvalDistributedSampler` deals this rank, fed 3 at a time; rank 0 writes {n: computed values} as JSON."""
    from mst_clipiqa.data.samplers import EvalDistributedSampler
    from mst_clipiqa.metrics import make_metrics

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = {}
        for n in sizes:
            preds, target = mos_like(n, 7, ties=True)
            shard = torch.tensor(list(EvalDistributedSampler(range(n))), dtype=torch.long)
            metrics = make_metrics("test/", logistic=True)
            for index in shard.split(3):
                metrics.update(preds[index].bfloat16(), target[index])
            results[n] = {key: value.item() for key, value in metrics.compute().items()}
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


UNEVEN_COUNTS = ((3, 2), (2, 0), (0, 1))
"""Rows on rank 0 and rank 1 in each call of `gathered_uneven_rows`, as the unpadded evaluation sampler leaves them."""


def gathered_uneven_rows(rank: int, init_file: str, out_file: str) -> None:
    """`gather_rows` on 2 ranks, once for each of `UNEVEN_COUNTS`: rank r holds its count of 4-wide float64 rows,
    numbered from 100 r; rank 0 saves the gathered tensors."""
    from mst_clipiqa.training.callbacks import gather_rows

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = []
    for counts in UNEVEN_COUNTS:
        rows = torch.arange(counts[rank] * 4, dtype=torch.float64).reshape(-1, 4) + 100 * rank
        results.append(gather_rows(rows))
    if rank == 0:
        torch.save(results, out_file)
    dist.destroy_process_group()
