"""ResumableDistributedSampler: DistributedSampler semantics plus mid-epoch resume."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from opensora_vae.data import ResumableDistributedSampler as RDS


def test_matches_torch_distributed_sampler():
    data = list(range(23))
    for drop_last in (False, True):
        for rank in range(3):
            ours = RDS(data, num_replicas=3, rank=rank, seed=4, drop_last=drop_last)
            ref = DistributedSampler(data, num_replicas=3, rank=rank, seed=4, drop_last=drop_last)
            for epoch in (0, 2):
                ours.set_epoch(epoch)
                ref.set_epoch(epoch)
                assert list(ours) == list(ref) and len(ours) == len(ref)


def test_two_ranks_cover_disjointly():
    data = list(range(20))
    a, b = (list(RDS(data, num_replicas=2, rank=r, seed=1)) for r in (0, 1))
    assert len(a) == len(b) == 10
    assert not set(a) & set(b) and set(a) | set(b) == set(data)

    odd = list(range(11))  # padded to equal length, every index still covered
    a, b = (list(RDS(odd, num_replicas=2, rank=r)) for r in (0, 1))
    assert len(a) == len(b) == 6 and set(a) | set(b) == set(odd)
    a, b = (list(RDS(odd, num_replicas=2, rank=r, drop_last=True)) for r in (0, 1))
    assert len(a) == len(b) == 5 and not set(a) & set(b)


def test_set_epoch_changes_order():
    s = RDS(list(range(50)), num_replicas=1, rank=0, seed=0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == sorted(first)
    s.set_epoch(0)
    assert list(s) == first
    assert list(RDS(list(range(50)), num_replicas=1, rank=0, shuffle=False)) == list(range(50))


def test_resume_mid_epoch_yields_exactly_the_rest():
    data = list(range(37))
    s = RDS(data, num_replicas=2, rank=1, seed=3)
    s.set_epoch(5)
    full = list(s)
    loader = DataLoader(data, batch_size=4, sampler=s)
    for step, _batch in enumerate(loader):
        s.advance(4)  # the trainer reports each completed step
        if step == 2:
            break
    state = s.state_dict()
    assert state == {"epoch": 5, "consumed": 12}

    resumed = RDS(data, num_replicas=2, rank=1, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(5)  # the resumed epoch loop calls this again: progress must survive
    assert list(resumed) == full[12:] and len(resumed) == len(full) - 12
    rest = [i for batch in DataLoader(data, batch_size=4, sampler=resumed) for i in batch.tolist()]
    assert rest == full[12:]

    resumed.set_epoch(6)  # a new epoch starts from its beginning
    assert len(resumed) == len(full) and resumed.state_dict() == {"epoch": 6, "consumed": 0}


def test_advance_clamps_and_validates():
    s = RDS(list(range(10)), num_replicas=1, rank=0)
    s.advance(25)
    assert len(s) == 0 and list(s) == [] and s.state_dict()["consumed"] == 10
    with pytest.raises(ValueError):
        s.advance(-1)
    with pytest.raises(ValueError):
        RDS(list(range(10)), num_replicas=2, rank=2)
    with pytest.raises(ValueError):
        RDS([], num_replicas=1, rank=0)


def test_defaults_without_process_group():
    s = RDS(torch.arange(6), seed=0)
    assert (s.num_replicas, s.rank, len(s)) == (1, 0, 6)
