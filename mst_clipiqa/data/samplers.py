"""Evaluation sampling under DDP: every sample exactly once across ranks, so set-level rankings stay exact."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch.distributed as dist
from torch.utils.data import DistributedSampler


class EvalDistributedSampler(DistributedSampler):
    """Deal indices round-robin to the ranks, in order, without the padding `DistributedSampler` adds.

    Rank ``r`` of ``W`` gets ``r, r + W, r + 2W, ...`` of ``range(len(dataset))``, so the ranks together see every
    sample exactly once. `DistributedSampler` instead repeats samples until all ranks have the same count; a repeated
    image counts twice in SRCC and PLCC over the gathered predictions and biases them. Ranks may therefore differ by
    one sample (and by one batch), which is safe for evaluation: no gradient is synchronised, and the metrics
    gather whatever each rank holds.

    It subclasses `DistributedSampler` because Lightning leaves a loader's sampler alone when it already is one, so
    the Trainer's default ``use_distributed_sampler=True`` still shards (and shuffles) the training loader.

    World size and rank come from the arguments, else from the initialised default process group, else it is a
    plain sequential sampler (one replica, rank 0). They are read once, here: build it inside the ``*_dataloader``
    hooks, which Lightning calls after the process group exists.

    Lightning's `lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler` deals indices the same way;
    this one differs where evaluation and scoring need it to:

    - without a process group, and no ``num_replicas`` and ``rank`` given, it is the one replica, where Lightning's
      raises a ``ValueError``: the scorer builds it so in one process and under DDP alike;
    - it never shuffles: Lightning's shuffles unless told not to (``shuffle=True`` by default), seeded by the epoch;
    - a rank may get no sample at all when there are fewer samples than ranks (2 test rows on 4 devices, a scoring
      job of fewer images than devices), where Lightning's stops with an ``AssertionError``.

    Args:
        dataset: any sized dataset.
        num_replicas: number of ranks; defaults to the world size.
        rank: this process's rank; defaults to the global rank.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            num_replicas = 1 if num_replicas is None else num_replicas
            rank = 0 if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        # The parent sized these for a padded split; keep them true for code that reads them instead of len().
        self.total_size = len(dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
