"""Training checkpoints: `OUTPUTS/<run>/epochE-global_stepS/`, written durably and pruned on request.

Layout: `model/` (published format, loadable by VideoAutoencoderPipeline.from_pretrained), `optimizer.pt`,
`loss.pt` (the learned logvar), `running_states.json` (epoch, step, sampler position, ...),
`rng/rank{R}.pt` (each rank's random states), and the optional parts a run has: `ema/` (published format, the
weights' moving average), `discriminator.pt` and `discriminator_optimizer.pt`.

Durability: everything is written under `.tmp-NAME`, fsynced (files and folder), then renamed, and the run folder
is fsynced, so neither a kill nor a power loss leaves a half-written folder under a checkpoint name. Replacing an
existing NAME goes through `.old-NAME`; `latest_checkpoint` renames an orphaned `.old-NAME` back.

Failures: a full disk, a read-only file system or a permission error on any rank makes every rank raise
`CheckpointSaveError` (one line: the cause and the last good checkpoint) after the partial folder is removed; the
ranks agree on the outcome first, so none is left waiting at a barrier.

Retention: a checkpoint of the full model is several GB, so `prune_checkpoints` keeps the newest `keep_last`
(plus every `keep_every`-th step) and deletes the rest, only ever after a newer checkpoint is complete.
`free_space_warning` says early when the next saves will not fit.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..distributed import barrier
from ..errors import RunError, UserError

logger = logging.getLogger(__name__)

RUNNING_STATES = "running_states.json"
_NAME = re.compile(r"^epoch(\d+)-global_step(\d+)$")
TMP_PREFIX, OLD_PREFIX, DEL_PREFIX = ".tmp-", ".old-", ".del-"
# Below this much free space, an error without an errno (torch's "PytorchStreamWriter failed ...") is put down to
# a full disk: a failed write has just used up what was left.
LOW_SPACE_BYTES = 64 * 2**20

_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


class CheckpointSaveError(RunError):
    """A checkpoint could not be written (on any rank). Raised on every rank, after the partial folder is gone;
    the previous checkpoint is untouched. `cause` is the diagnosis, `last_complete` the checkpoint to resume."""

    def __init__(self, message: str, checkpoint: Path, cause: str, last_complete: Optional[Path]):
        super().__init__(message)
        self.checkpoint, self.cause, self.last_complete = checkpoint, cause, last_complete


def checkpoint_name(epoch: int, step: int) -> str:
    return f"epoch{epoch}-global_step{step}"


def rng_state(generators: Dict[str, torch.Generator]) -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state(),
                             "generators": {k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any], generators: Dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in generators.items():
        gen.set_state(state["generators"][name])


# ----- sizes and free space ---------------------------------------------------------------------------------
def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 10 else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _existing(path: Path) -> Path:
    """The path or its nearest existing parent (disk usage and statvfs need something that exists)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free_bytes(path: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(_existing(path)).free
    except OSError:
        return None


def checkpoint_bytes(path: Path) -> int:
    """Size on disk of a checkpoint folder (allocated blocks, so sparse or compressed files count as stored)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            blocks = getattr(st, "st_blocks", None)
            total += blocks * 512 if blocks is not None else st.st_size
    return total


def free_space_warning(run_dir: Path, expected_bytes: int) -> Optional[str]:
    """One line when the run folder's file system has room for fewer than about two saves of `expected_bytes`
    (a save needs its own size free while the previous checkpoint still exists); None when there is room."""
    free = _free_bytes(Path(run_dir))
    if free is None or expected_bytes <= 0 or free >= 2 * expected_bytes:
        return None
    outlook = "the next save will fail" if free < expected_bytes else "the save after next may fail"
    return (f"only {format_bytes(free)} free for checkpoints in {run_dir}, and a checkpoint takes about "
            f"{format_bytes(expected_bytes)}: {outlook}; set keep_last to delete old checkpoints, or free space")


# ----- why a save failed ------------------------------------------------------------------------------------
def _errno_of(err: BaseException) -> Optional[int]:
    """The errno of an error or of what caused it; safetensors only puts it in its text ("os error 28")."""
    seen = set()
    e: Optional[BaseException] = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(getattr(e, "errno", None), int):
            return e.errno
        m = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(e))
        if m:
            return int(m.group(1) or m.group(2))
        e = e.__cause__ or e.__context__
    return None


def diagnose_save_error(err: BaseException, path: Path, low_space: int = LOW_SPACE_BYTES) -> str:
    """A short cause for a failed write under `path`: from the errno when there is one; otherwise (torch's
    RuntimeError carries none) from the file system: mounted read-only, almost full, not writable; else the text."""
    path = Path(path)
    code = _errno_of(err)
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path)
        return _CAUSES[code] + (f" ({format_bytes(free)} free)" if code == errno.ENOSPC and free is not None else "")
    if code == errno.EROFS:
        return _CAUSES[code]
    if code in (errno.EACCES, errno.EPERM):
        where = getattr(err, "filename", None) or path
        return f"{_CAUSES[code]} on {where}"
    if code is None:
        where = _existing(path)
        try:
            read_only = bool(os.statvfs(where).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):
            read_only = False
        if read_only:
            return _CAUSES[errno.EROFS]
        free = _free_bytes(where)
        if free is not None and free < low_space:
            return f"{_CAUSES[errno.ENOSPC]} ({format_bytes(free)} free)"
        if not os.access(where, os.W_OK | os.X_OK):
            return f"{_CAUSES[errno.EACCES]} on {where}"
    return " ".join(str(err).split()) or type(err).__name__


def _is_io_error(err: BaseException) -> bool:
    # OSError, torch's RuntimeError ("PytorchStreamWriter failed ...", "basic_ios::clear"), SafetensorError.
    return isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError"


# ----- durable writes ---------------------------------------------------------------------------------------
def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        # Some file systems cannot fsync a folder; the data files themselves were synced.
        if not (directory and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Every file, then every folder (deepest first), so the renamed folder's contents are on disk."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root), directory=True)


def _torch_save(obj: Any, path: Path) -> None:
    # Through an open file: a full disk then fails with OSError(ENOSPC) rather than torch's errno-less text.
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _attempt(fn: Callable[[], None], where: Path) -> Optional[Tuple[BaseException, str]]:
    """Run one stage of a save; an Exception becomes (error, diagnosis) so all ranks can agree before raising."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - every rank must reach the agreement, whatever failed
        return err, diagnose_save_error(err, where if Path(where).exists() else Path(where).parent)
    return None


def _agree(failure: Optional[Tuple[BaseException, str]], rank: int, run_dir: Path, name: str, tmp: Path) -> None:
    """Collective: every rank learns whether any failed. If one did, rank 0 removes the partial folder and every
    rank raises CheckpointSaveError (the failing rank re-raises an error that is not I/O, a bug, as it is)."""
    message = None if failure is None else failure[1]
    if dist.is_available() and dist.is_initialized():
        messages: List[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
    else:
        messages = [message]
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if not failed:
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()  # the partial folder is gone before any rank exits (torchrun stops the others when one does)
    bad_rank, cause = failed[0]
    last = latest_checkpoint(run_dir)
    text = f"could not save checkpoint {name} in {run_dir}: " + (f"rank {bad_rank}: " if len(messages) > 1 else "")
    text += cause + (f"; the last complete checkpoint, {last}, is intact" if last is not None
                     else f"; there is no earlier complete checkpoint in {run_dir}")
    if tmp.exists():
        text += f"; remove the partial folder {tmp} by hand"
    if failure is not None and not _is_io_error(failure[0]):
        raise failure[0]
    raise CheckpointSaveError(text, run_dir / name, cause, last) from (failure[0] if failure else None)


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
    extras: Optional[Dict[str, Any]] = None,
) -> Path:
    """Called on every rank (collective). Rank 0 writes the shared parts; each rank writes its RNG state.
    `extras` (rank 0): name -> a callable writing that file or folder at the path it is given, or an object
    written with torch.save. Raises CheckpointSaveError on every rank when any rank fails to write; the previous
    checkpoint is kept."""
    run_dir = Path(run_dir)
    final = run_dir / checkpoint_name(epoch, step)
    tmp = run_dir / f"{TMP_PREFIX}{final.name}"

    def prepare() -> None:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed save
        (tmp / "rng").mkdir(parents=True)

    def write() -> None:
        _torch_save(rng, tmp / "rng" / f"rank{rank}.pt")
        if rank == 0:
            model.save_pretrained(tmp / "model")
            _torch_save(optimizer_state, tmp / "optimizer.pt")
            _torch_save(loss_state, tmp / "loss.pt")
            for name, part in (extras or {}).items():
                if callable(part):
                    part(tmp / name)
                else:
                    _torch_save(part, tmp / name)
            (tmp / RUNNING_STATES).write_text(json.dumps(running_states, indent=2))

    def publish() -> None:
        _fsync_tree(tmp)  # contents on disk before the name says "complete"
        old = None
        if final.exists():  # an earlier run wrote this step: keep it until the new one is in place
            old = run_dir / f"{OLD_PREFIX}{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                os.replace(old, final)
            raise
        _fsync_path(run_dir, directory=True)  # the rename is durable before the old copy goes
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    _agree(_attempt(prepare, run_dir) if rank == 0 else None, rank, run_dir, final.name, tmp)
    _agree(_attempt(write, tmp), rank, run_dir, final.name, tmp)
    _agree(_attempt(publish, tmp) if rank == 0 else None, rank, run_dir, final.name, tmp)
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


# ----- finding and pruning ----------------------------------------------------------------------------------
def _complete_checkpoints(run_dir: Path) -> List[Tuple[int, int, Path]]:
    """(step, epoch, path) of every complete checkpoint, oldest first."""
    found = []
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        m = _NAME.match(p.name)
        if m and (p / RUNNING_STATES).is_file():
            found.append((int(m.group(2)), int(m.group(1)), p))
    return sorted(found)


def _recover_old(run_dir: Path) -> None:
    """A kill between the two renames of a replaced checkpoint leaves only `.old-NAME`: the complete previous
    checkpoint. Put it back under NAME (another rank may be doing the same: losing that race is fine)."""
    for p in list(run_dir.iterdir()):
        name = p.name[len(OLD_PREFIX):]
        if not (p.name.startswith(OLD_PREFIX) and _NAME.match(name)) or (run_dir / name).exists():
            continue
        if not (p / RUNNING_STATES).is_file():
            continue
        try:
            os.rename(p, run_dir / name)
            logger.warning("recovered checkpoint %s from %s (a save of it was interrupted)", run_dir / name, p.name)
        except FileNotFoundError:
            pass  # renamed by another process meanwhile
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # else NAME appeared meanwhile: nothing to do
                logger.warning("could not rename %s back to %s (%s): it is the complete checkpoint of that step",
                               p, name, e)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step in a run folder (`.tmp-*` folders are ignored; an orphaned
    `.old-NAME` is renamed back to NAME first)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    _recover_old(run_dir)
    found = _complete_checkpoints(run_dir)
    return found[-1][2] if found else None


def _remove(path: Path) -> bool:
    try:
        shutil.rmtree(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as e:
        logger.warning("could not delete %s: %s", path, e)
        return False


def check_retention(keep_last: Optional[int], keep_every: Optional[int]) -> None:
    for name, value in (("keep_last", keep_last), ("keep_every", keep_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{name} must be an integer >= 1 (or None), got {value!r}")


def prune_checkpoints(run_dir: Path, keep_last: Optional[int], keep_every: Optional[int] = None) -> List[Path]:
    """Delete old complete checkpoints: keep the `keep_last` newest (by step) and those whose step is a multiple
    of `keep_every`; `keep_last=None` keeps all. Call it after a save succeeded, on one rank: the newest is never
    deleted. Each goes through `.del-NAME` first, so a kill mid-delete never leaves a half-deleted folder under a
    checkpoint name; leftover `.del-*` folders and stale `.old-NAME` (NAME complete) are removed too.
    Returns what was deleted, under the names it had (a failed delete is logged, not raised)."""
    check_retention(keep_last, keep_every)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    deleted: List[Path] = []
    complete = _complete_checkpoints(run_dir)
    complete_names = {p.name for _, _, p in complete}
    for p in sorted(run_dir.iterdir()):
        stale_old = p.name.startswith(OLD_PREFIX) and p.name[len(OLD_PREFIX):] in complete_names
        if (p.name.startswith(DEL_PREFIX) or stale_old) and p.is_dir() and _remove(p):
            deleted.append(p)
    if keep_last is None:
        return deleted
    for i, (step, _, path) in enumerate(complete):
        if i >= len(complete) - keep_last or (keep_every and step % keep_every == 0):
            continue
        doomed = run_dir / f"{DEL_PREFIX}{path.name}"
        try:
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(path, doomed)
        except FileNotFoundError:
            continue
        except OSError as e:
            logger.warning("could not delete old checkpoint %s: %s", path, e)
            continue
        _remove(doomed)
        deleted.append(path)
    return deleted


def consolidated_optimizer_state(optimizer) -> Optional[Dict[str, Any]]:
    """Full optimizer state on rank 0 (ZeroRedundancyOptimizer shards it across ranks); None elsewhere."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
        return optimizer.state_dict() if dist.get_rank() == 0 else None
    return optimizer.state_dict()
