"""Training checkpoints: `OUTPUTS/<run>/epochE-global_stepS/` written atomically.

Layout: `model/` (published format, loadable by VideoAutoencoderPipeline.from_pretrained), `optimizer.pt`,
`loss.pt` (the learned logvar), `running_states.json` (epoch, step, sampler position, ...) and
`rng/rank{R}.pt` (each rank's random states). Everything is written under a temporary name, then renamed, so a
kill at any moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from ..distributed import barrier

RUNNING_STATES = "running_states.json"
_NAME = re.compile(r"^epoch(\d+)-global_step(\d+)$")


def checkpoint_name(epoch: int, step: int) -> str:
    return f"epoch{epoch}-global_step{step}"


def rng_state(generators: Dict[str, torch.Generator]) -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "generators": {k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any], generators: Dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in generators.items():
        gen.set_state(state["generators"][name])


def save_checkpoint(
    run_dir: Path,
    epoch: int,
    step: int,
    rank: int,
    model,
    loss_state: Dict[str, torch.Tensor],
    optimizer_state: Optional[Dict[str, Any]],
    running_states: Dict[str, Any],
    rng: Dict[str, Any],
) -> Path:
    """Called on every rank (collective). Rank 0 writes the shared parts; each rank writes its RNG state."""
    run_dir = Path(run_dir)
    final = run_dir / checkpoint_name(epoch, step)
    tmp = run_dir / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed save
        (tmp / "rng").mkdir(parents=True)
    barrier()
    torch.save(rng, tmp / "rng" / f"rank{rank}.pt")
    if rank == 0:
        model.save_pretrained(tmp / "model")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(loss_state, tmp / "loss.pt")
        (tmp / RUNNING_STATES).write_text(json.dumps(running_states, indent=2))
    barrier()
    if rank == 0:
        if final.exists():  # an earlier run wrote this step: keep it until the new one is in place
            old = run_dir / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    barrier()
    return final


def load_checkpoint(path: Path, rank: int) -> Dict[str, Any]:
    """Read a checkpoint folder: running states, optimizer and loss states, this rank's RNG state."""
    path = Path(path)
    states_file = path / RUNNING_STATES
    if not states_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a training checkpoint (no {RUNNING_STATES}); to start from weights only, use "
            f"--cfg-options model.from_pretrained={path}"
        )
    running = json.loads(states_file.read_text())
    rng_file = path / "rng" / f"rank{rank}.pt"
    return {
        "running_states": running,
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        "loss": torch.load(path / "loss.pt", map_location="cpu", weights_only=True),
        "rng": torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None,
        "model_dir": path / "model",
    }


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step in a run folder (temporary folders are ignored)."""
    found = []
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        m = _NAME.match(p.name)
        if m and (p / RUNNING_STATES).is_file():
            found.append((int(m.group(2)), p))
    return max(found)[1] if found else None


def consolidated_optimizer_state(optimizer) -> Optional[Dict[str, Any]]:
    """Full optimizer state on rank 0 (ZeroRedundancyOptimizer shards it across ranks); None elsewhere."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
        return optimizer.state_dict() if dist.get_rank() == 0 else None
    return optimizer.state_dict()
