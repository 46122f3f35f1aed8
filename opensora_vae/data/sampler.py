"""A DistributedSampler that can resume in the middle of an epoch."""
from __future__ import annotations

import math
from typing import Any, Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["ResumableDistributedSampler"]


class ResumableDistributedSampler(Sampler[int]):
    """DistributedSampler semantics (same permutation, padding and rank split) plus mid-epoch resume.

    Progress is counted by the trainer, not by iteration: DataLoader workers prefetch ahead of
    training, so the sampler cannot know what was actually consumed. After each completed step the
    trainer calls `advance(batch_size)` (samples of *this rank*); `state_dict()` then records
    `{"epoch", "consumed"}`, and after `load_state_dict` the next `__iter__` starts right after the
    consumed samples of that epoch. `set_epoch(e)` with a new epoch resets `consumed` to 0; with the
    current epoch (the usual call right after resuming) it keeps it. `__len__` is what remains.

    `consumed` is per rank, so resume with the same world size to get exactly the same samples.
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
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
        self.dataset = dataset
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed = 0
        n = len(dataset)
        if n == 0:
            raise ValueError("cannot sample from an empty dataset")
        if drop_last and n % self.num_replicas:
            self.num_samples = n // self.num_replicas
        else:
            self.num_samples = math.ceil(n / self.num_replicas)
        if self.num_samples == 0:
            raise ValueError(f"drop_last with {n} samples leaves nothing for {self.num_replicas} ranks")
        self.total_size = self.num_samples * self.num_replicas

    def epoch_indices(self) -> list[int]:
        """All indices this rank gets in the current epoch, consumed ones included."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        if len(indices) < self.total_size:
            # pad by repeating from the front so every rank gets the same count
            pad = self.total_size - len(indices)
            indices += (indices * math.ceil(pad / len(indices)))[:pad]
        else:
            indices = indices[: self.total_size]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.consumed :])

    def __len__(self) -> int:
        return self.num_samples - self.consumed

    def set_epoch(self, epoch: int) -> None:
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0

    def advance(self, n: int) -> None:
        """Record that this rank finished training on `n` more samples of the current epoch."""
        if n < 0:
            raise ValueError(f"advance expects n >= 0, got {n}")
        self.consumed = min(self.num_samples, self.consumed + int(n))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.consumed = max(0, min(self.num_samples, int(state["consumed"])))
