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
    assert state == {"epoch": 5, "position": 24, "world_size": 2}  # 12 samples on each of 2 ranks

    resumed = RDS(data, num_replicas=2, rank=1, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(5)  # the resumed epoch loop calls this again: progress must survive
    assert list(resumed) == full[12:] and len(resumed) == len(full) - 12
    rest = [i for batch in DataLoader(data, batch_size=4, sampler=resumed) for i in batch.tolist()]
    assert rest == full[12:]

    resumed.set_epoch(6)  # a new epoch starts from its beginning
    assert len(resumed) == len(full) and resumed.state_dict() == {"epoch": 6, "position": 0, "world_size": 2}


def test_advance_clamps_and_validates():
    s = RDS(list(range(10)), num_replicas=1, rank=0)
    s.advance(25)
    assert len(s) == 0 and list(s) == [] and s.state_dict()["position"] == 10
    with pytest.raises(ValueError):
        s.advance(-1)
    with pytest.raises(ValueError):
        RDS(list(range(10)), num_replicas=2, rank=2)
    with pytest.raises(ValueError):
        RDS([], num_replicas=1, rank=0)


def test_defaults_without_process_group():
    s = RDS(torch.arange(6), seed=0)
    assert (s.num_replicas, s.rank, len(s)) == (1, 0, 6)


def _consume(data, world, steps, batch, state=None, epoch=3, seed=7, drop_last=False):
    """Run `steps` lockstep steps of `batch` samples per rank; the rows taken and the (shared) saved state."""
    samplers = [RDS(data, num_replicas=world, rank=r, seed=seed, drop_last=drop_last) for r in range(world)]
    taken = []
    for s in samplers:
        if state is not None:
            s.load_state_dict(state)
        s.set_epoch(epoch)
    iters = [iter(s) for s in samplers]
    for _ in range(steps):
        for s, it in zip(samplers, iters):
            taken += [next(it) for _ in range(batch)]
            s.advance(batch)
    states = [s.state_dict() for s in samplers]
    assert all(st["position"] == states[0]["position"] for st in states)  # one global position on every rank
    return taken, states[0], samplers


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2), (4, 2), (2, 4), (3, 2)])
def test_resume_on_another_number_of_ranks_sees_every_row_once(first, second):
    data = list(range(24))
    before, state, _ = _consume(data, first, steps=2, batch=1)
    rest = _consume(data, second, steps=0, batch=1, state=state)[2]
    after = [i for s in rest for i in s]
    assert len(before) == 2 * first and sorted(before + after) == data  # each row exactly once


def test_resume_at_the_same_world_size_is_distributed_samplers_order():
    data = list(range(23))
    before, state, _ = _consume(data, 3, steps=2, batch=2)
    rest = _consume(data, 3, steps=0, batch=1, state=state)[2]
    for r, s in enumerate(rest):
        ref = DistributedSampler(data, num_replicas=3, rank=r, seed=7)
        ref.set_epoch(3)
        assert list(s) == list(ref)[4:] and len(s) == len(list(ref)) - 4


def test_uneven_remainder_is_padded_like_distributed_sampler():
    data = list(range(10))
    before, state, _ = _consume(data, 1, steps=3, batch=1)  # 7 rows left for 2 ranks: one repeat pads them
    rest = _consume(data, 2, steps=0, batch=1, state=state)[2]
    a, b = (list(s) for s in rest)
    assert len(a) == len(b) == 4 and set(before) | set(a) | set(b) == set(data)
    cut = _consume(data, 2, steps=0, batch=1, state=state, drop_last=True)[2]
    assert [len(s) for s in cut] == [3, 3]  # drop_last drops the odd row instead


def test_old_per_rank_state_resumes_at_the_same_position():
    data = list(range(20))
    new = RDS(data, num_replicas=1, rank=0, seed=2)
    new.load_state_dict({"epoch": 1, "consumed": 3, "world_size": 2})
    new.set_epoch(1)
    assert new.state_dict()["position"] == 6 and len(new) == 14
