import pytest
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from mst_clipiqa.data.samplers import EvalDistributedSampler


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", range(14))
def test_ranks_cover_every_index_exactly_once(world_size, n):
    dataset = list(range(n))
    shards = [list(EvalDistributedSampler(dataset, num_replicas=world_size, rank=r)) for r in range(world_size)]

    assert sorted(i for shard in shards for i in shard) == list(range(n))
    for rank, shard in enumerate(shards):
        assert shard == list(range(rank, n, world_size))
        sampler = EvalDistributedSampler(dataset, num_replicas=world_size, rank=rank)
        assert len(sampler) == len(shard) == sampler.num_samples
        assert sampler.total_size == n


def test_padding_sampler_would_repeat_samples():
    # The failure this sampler exists for: 11 items on 2 ranks become 12 with DistributedSampler.
    dataset = list(range(11))
    padded = [i for r in range(2) for i in DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=False)]
    exact = [i for r in range(2) for i in EvalDistributedSampler(dataset, num_replicas=2, rank=r)]
    assert len(padded) == 12
    assert sorted(exact) == dataset


def test_without_process_group_is_sequential():
    assert not dist.is_initialized()
    sampler = EvalDistributedSampler(list(range(5)))
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    assert list(sampler) == [0, 1, 2, 3, 4]
    assert [b.tolist() for b in DataLoader(list(range(5)), batch_size=2, sampler=sampler)] == [[0, 1], [2, 3], [4]]


def test_reads_world_size_and_rank_from_process_group(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 2)

    sampler = EvalDistributedSampler(list(range(10)))

    assert (sampler.num_replicas, sampler.rank) == (3, 2)
    assert list(sampler) == [2, 5, 8]
    assert len(sampler) == 3


def test_is_a_distributed_sampler_so_lightning_keeps_it():
    assert isinstance(EvalDistributedSampler([0, 1], num_replicas=2, rank=1), DistributedSampler)


def test_order_ignores_epoch():
    sampler = EvalDistributedSampler(list(range(7)), num_replicas=2, rank=0)
    first = list(sampler)
    sampler.set_epoch(5)
    assert list(sampler) == first == [0, 2, 4, 6]


def test_rejects_rank_outside_world():
    with pytest.raises(ValueError, match="Invalid rank"):
        EvalDistributedSampler(list(range(4)), num_replicas=2, rank=2)
