"""The one split of work across ranks (distributed.rank_share) and its inverse (gather_shares), used by every job:
inference and encoding rows, the protocol evaluator's clips, eval_common_metric's batches, the training sampler."""
from __future__ import annotations

import pytest

from opensora_vae.distributed import gather_shares, rank_share, rank_world


@pytest.mark.parametrize("n, world", [(0, 2), (1, 3), (7, 1), (7, 2), (7, 3), (9, 4)])
def test_shares_cover_every_item_once_and_gather_back_in_order(n, world, monkeypatch):
    items = [f"clip{i}" for i in range(n)]
    shares = [rank_share(items, rank, world) for rank in range(world)]
    assert sorted(x for s in shares for x in s) == sorted(items)
    assert [len(s) for s in shares] == sorted((len(s) for s in shares), reverse=True)  # lower ranks take the rest

    def all_gather_object(parts, mine):  # what gloo gives every rank: each rank's share, by rank
        parts[:] = shares

    monkeypatch.setattr("torch.distributed.all_gather_object", all_gather_object)
    assert gather_shares(shares[0], world) == items


def test_without_a_process_group_one_rank_takes_everything():
    assert rank_world() == (0, 1)
    assert rank_share(range(5)) == [0, 1, 2, 3, 4] and gather_shares([1, 2]) == [1, 2]
    with pytest.raises(ValueError, match="invalid rank 2 for 2 ranks"):
        rank_share([1, 2, 3], 2, 2)
