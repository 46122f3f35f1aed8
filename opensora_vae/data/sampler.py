"""A DistributedSampler that resumes in the middle of an epoch, on the same or another number of ranks."""
from __future__ import annotations

import math
from typing import Any, Iterator, Sized

import torch
from torch.utils.data import Sampler

from ..distributed import rank_share, rank_world

__all__ = ["ResumableDistributedSampler"]


class ResumableDistributedSampler(Sampler[int]):
    """DistributedSampler semantics (same permutation, padding and rank split) plus mid-epoch resume.

    Rank r takes every `num_replicas`-th index of the epoch's order, so after k steps of b samples on every rank
    the samples trained on are exactly the first k * b * num_replicas of that order: progress is one global
    `position`, whatever the number of ranks. A checkpoint from N ranks therefore resumes on M ranks with the rest
    of the epoch, each row once: the remaining rows are split over the M ranks and padded (repeating the order's
    first rows, as DistributedSampler does) to a multiple of M. At an unchanged world size the indices are
    DistributedSampler's.

    Progress is counted by the trainer, not by iteration: DataLoader workers prefetch ahead of training, so the
    sampler cannot know what was actually consumed. After each completed step every rank calls
    `advance(batch_size)` (samples of *this rank*). `set_epoch(e)` with a new epoch starts it from its beginning;
    with the current epoch (the usual call right after resuming) it keeps the position. `__len__` is what remains
    on this rank.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        group_rank, group_size = rank_world()
        num_replicas = group_size if num_replicas is None else num_replicas
        rank = group_rank if rank is None else rank
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
        self.dataset = dataset
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0  # global position at which this rank's current share begins (epoch start or resume)
        self.consumed = 0  # samples this rank finished since `start`
        n = len(dataset)
        if n == 0:
            raise ValueError("cannot sample from an empty dataset")
        self.num_samples = self._share(0)  # per rank, in a whole epoch
        if self.num_samples == 0:
            raise ValueError(f"drop_last with {n} samples leaves nothing for {self.num_replicas} ranks")

    def _share(self, start: int) -> int:
        """Samples per rank from global position `start` to the epoch's end (padded, or cut with drop_last)."""
        left = max(0, len(self.dataset) - start)
        return left // self.num_replicas if self.drop_last else math.ceil(left / self.num_replicas)

    def _order(self) -> list[int]:
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(n, generator=g).tolist()

    def epoch_indices(self) -> list[int]:
        """This rank's indices from `start` to the end of the epoch, the consumed ones included."""
        order = self._order()
        end = self.start + self._share(self.start) * self.num_replicas
        cycled = order * math.ceil(end / len(order))  # padding repeats the order from its front
        return rank_share(cycled[self.start:end], self.rank, self.num_replicas)

    @property
    def position(self) -> int:
        """Samples of this epoch trained on by all ranks together."""
        return self.start + self.consumed * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.consumed :])

    def __len__(self) -> int:
        return self._share(self.start) - self.consumed

    def set_epoch(self, epoch: int) -> None:
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.start = self.consumed = 0

    def advance(self, n: int) -> None:
        """Record that this rank finished training on `n` more samples of the current epoch."""
        if n < 0:
            raise ValueError(f"advance expects n >= 0, got {n}")
        self.consumed = min(self._share(self.start), self.consumed + int(n))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "world_size": self.num_replicas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved global position, with this sampler's number of ranks. States written before the
        position was global hold a per-rank `consumed`: with their `world_size` it gives the same position."""
        self.epoch = int(state["epoch"])
        if "position" in state:
            position = int(state["position"])
        else:
            position = int(state["consumed"]) * int(state.get("world_size", self.num_replicas))
        self.start = max(0, min(len(self.dataset), position))
        self.consumed = 0
