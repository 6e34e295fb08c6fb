"""Evaluation sampling under DDP: every sample exactly once across ranks, so set-level rankings stay exact."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch.distributed as dist
from torch.utils.data import DistributedSampler


class EvalDistributedSampler(DistributedSampler):
    """Deal indices round-robin to the ranks, in order: rank ``r`` of ``W`` gets ``r, r + W, r + 2W, ...``, so the
    ranks together see every sample exactly once. `DistributedSampler` pads with repeats instead, and a repeated
    image counts twice in SRCC and PLCC over the gathered predictions; here ranks may differ by one sample (and one
    batch), which evaluation allows, as no gradient is synchronised.

    It is a `DistributedSampler` so that Lightning leaves it alone. World size and rank come from the arguments, else
    from the default process group (build it in the ``*_dataloader`` hooks, after that exists), else it is one
    replica. Lightning's `UnrepeatedDistributedSampler` deals the same way, but without a process group it needs both
    given (the scorer builds this one bare), it shuffles by default, and it stops when a rank gets no sample.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            num_replicas = 1 if num_replicas is None else num_replicas
            rank = 0 if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        # The parent sized these for a padded split; its __len__ returns num_samples.
        self.total_size = len(dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))
