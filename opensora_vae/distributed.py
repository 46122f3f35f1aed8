"""Process group from the torchrun environment, model wrapping, rank-0 helpers, and the one split of work across
ranks (`rank_share`, undone by `gather_shares`)."""
from __future__ import annotations

import ctypes
import datetime
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .runtime import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def exit_with_launcher() -> None:
    """Under torchrun, have the kernel kill this worker when its agent dies (Linux parent-death signal): after a
    kill -9 of the agent no worker trains on, holds a GPU or writes into a run folder that a requeued job uses.
    Its DataLoader processes follow within seconds (they poll their parent)."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() == 1:  # the agent died before the call: nobody will send the signal
        os._exit(1)


def init_distributed(device: str = "auto", timeout: float = 600.0) -> DistInfo:
    """NCCL on GPU, gloo on CPU; a plain single process when not launched by torchrun. `timeout`: seconds a
    collective waits for a peer that died or hangs before this rank fails (torch's default is 10-30 minutes)."""
    use_cuda = resolve_device(device).type == "cuda"
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if "RANK" in os.environ and not dist.is_initialized():
        exit_with_launcher()
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=float(timeout)), **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (so all ranks stop together)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wrap_model(model: nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    """DDP when several ranks run; the bare model otherwise."""
    if not info.enabled or info.world_size == 1:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def rank_world() -> Tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_share(items: Sequence[Any], rank: Optional[int] = None, world_size: Optional[int] = None) -> List[Any]:
    """This rank's part of `items`: every world_size-th one, from its rank (default: the process group's). The split
    of every job: inference and encoding rows, the evaluators' clips and batches, the training sampler's epoch."""
    if rank is None or world_size is None:
        rank, world_size = rank_world()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for {world_size} ranks")
    return list(items[rank::world_size])


def gather_shares(share: Sequence[Any], world_size: Optional[int] = None) -> List[Any]:
    """Every rank's `rank_share` back in the items' order (a collective when world_size > 1): the inverse of the
    split, so what several ranks computed is what one rank would list."""
    world_size = rank_world()[1] if world_size is None else world_size
    if world_size == 1:
        return list(share)
    parts: List[Any] = [None] * world_size
    dist.all_gather_object(parts, list(share))
    return [parts[i % world_size][i // world_size] for i in range(sum(len(p) for p in parts))]
