"""Run folders: `OUTPUTS/NNN-name`, created atomically, the identity of the config that made each (run.json), and
which checkpoint `--load` resumes."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..config import check_config, load_config
from ..errors import RunError, UserError
from ..provenance import absolute_if_local, describe_keys, differing_keys, flatten
from ..registry import to_plain
from . import checkpoint as ckpt

logger = logging.getLogger("opensora_vae.train")

_RUN_DIR = re.compile(r"^(\d+)-(.+)$")
IDENTITY_FILE = "run.json"
# Keys that say how long, where, how fast or how verbosely a run goes, not what it trains: a requeued or extended
# run changes them and continues. Every other key of the resolved config is part of the run's identity.
RUN_CONTROL = frozenset({
    "max_steps", "epochs", "ckpt_every", "log_every", "keep_last", "keep_every", "keep_global_batch", "outputs",
    "run_name", "num_workers", "dist_timeout", "stop_signals", "device", "trackers", "wandb_project", "wandb_entity",
    "log_reconstructions_every", "log_samples", "find_unused_parameters", "shard_optimizer", "optimizer",
    "grad_checkpoint", "lpips_backbone_path",
})
# Where weights are found and how the model runs (model.<option>, model.vae_2d.<option>): no part of it either.
MODEL_CONTROL = frozenset({"compile", "winograd", "subpixel", "tiling", "micro_batch_size", "cache_dir",
                           "local_files_only"})
# Keys whose difference means a checkpoint cannot resume this config: other tensors (model, discriminator), or
# other trainable ones (AdamW's state would not fit).
STRUCTURE = ("model.", "discriminator.")
TRAINABLE = frozenset({"trainable", "train_spatial_only", "learn_logvar"})


def _location(value: Any) -> Any:
    """A local path as an absolute one (the same run started from another folder is the same run)."""
    return absolute_if_local(value)


def _run_control(key: str) -> bool:
    parts = key.split(".")
    if parts[0] != "model" or len(parts) < 2:
        return False
    return parts[1] in MODEL_CONTROL or (len(parts) == 3 and parts[1] in ("vae_2d", "vae_temporal")
                                         and parts[2] in MODEL_CONTROL | {"from_pretrained"})


def config_identity(cfg: Any) -> Dict[str, Any]:
    """The resolved config's keys that make a run what it is (flat, dotted): all but RUN_CONTROL and the model's
    runtime options and download settings; data and weight paths made absolute."""
    flat = flatten({k: v for k, v in to_plain(cfg).items() if k not in RUN_CONTROL})
    return {k: _location(v) if k in ("dataset.data_path", "model.from_pretrained") else v
            for k, v in flat.items() if not _run_control(k)}


def identity_hash(identity: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def write_identity(run_dir: Path, identity: Dict[str, Any], config: str) -> None:
    record = {"config": config, "hash": identity_hash(identity), "identity": identity}
    tmp = Path(run_dir) / f".{IDENTITY_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, Path(run_dir) / IDENTITY_FILE)


def read_identity(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The identity of the config that made `run_dir`: its run.json, or (folders from before run.json) the
    identity of its saved config.py; None when neither can be read."""
    run_dir = Path(run_dir)
    try:
        return json.loads((run_dir / IDENTITY_FILE).read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if not (run_dir / "config.py").is_file():
        return None
    try:
        return config_identity(check_config(load_config(run_dir / "config.py"), "train"))
    except Exception as err:  # noqa: BLE001 - an unreadable record is no record
        logger.debug("cannot read %s: %s", run_dir / "config.py", err)
        return None


def _structural(keys: List[str], theirs: Dict[str, Any], ours: Dict[str, Any]) -> List[str]:
    """The keys that stop a checkpoint from resuming: model and trainable tensors; the discriminator's only when
    both have one (a missing one starts afresh, with a warning)."""
    both_adversarial = all(any(k.startswith("discriminator.") for k in side) for side in (theirs, ours))
    return [k for k in keys if k.startswith("model.") or k in TRAINABLE
            or (k.startswith("discriminator.") and both_adversarial)]


def _runs(outputs: Path):
    return [(int(m.group(1)), m.group(2), p) for p in (outputs.iterdir() if outputs.is_dir() else [])
            if (m := _RUN_DIR.match(p.name)) and p.is_dir()]


def new_run_dir(outputs: Path, name: str) -> Path:
    """`OUTPUTS/NNN-name`, NNN one above the highest in use, created atomically: two jobs starting together, or a
    folder deleted before, never make two runs share a folder."""
    try:
        outputs.mkdir(parents=True, exist_ok=True)
        index = 1 + max((i for i, _, _ in _runs(outputs)), default=-1)
        while True:
            path = outputs / f"{index:03d}-{name}"
            try:
                path.mkdir()
                return path
            except FileExistsError:
                index += 1
    except OSError as err:  # e.g. a read-only file system: what the up-front check could not foresee
        raise RunError(f"outputs {outputs}: cannot make a run folder ({err.strerror or err})") from err


def find_resume(outputs: Path, name: str, load: Optional[str], identity: Optional[Dict[str, Any]] = None):
    """(run folder, checkpoint) to continue from `--load`, or (None, None) for a new run.

    `--load auto`: the newest complete checkpoint of the newest run folder of this name made by the same config
    (`identity`, see `config_identity`), or a new run when there is none or it has no checkpoint (so the identical
    command can be requeued). `--load RUN_DIR`: that folder's newest complete checkpoint. `--load CHECKPOINT`: that
    checkpoint. An explicit `--load` of another config's run is refused when the checkpoint cannot resume this
    config (model or trainable tensors differ), else resumed with one warning; both name the keys."""
    if load is None:
        return None, None
    if load == "auto":
        return _find_auto(outputs, name, identity)
    path = Path(load)
    if (path / ckpt.RUNNING_STATES).is_file():
        run_dir, found = path.resolve().parent, path
    elif path.is_dir():
        found = ckpt.latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"--load {path}: not a training checkpoint (no {ckpt.RUNNING_STATES}) and no "
                                    f"complete checkpoint in it; to start from weights only, use --ckpt-path")
        run_dir = path.resolve()
    else:
        hint = " (--load auto resumes the newest run of this config)" if load in ("latest", "last") else ""
        raise FileNotFoundError(f"--load {path}: no such folder{hint}; to start from weights only, use --ckpt-path")
    if identity is not None:
        _check_same_config(load, run_dir, found, identity)
    return run_dir, found


def _find_auto(outputs: Path, name: str, identity: Optional[Dict[str, Any]]):
    others = []
    for _, run_dir in sorted(((i, p) for i, n, p in _runs(outputs) if n == name), reverse=True):
        theirs = read_identity(run_dir) if identity is not None else {}
        keys = None if theirs is None else differing_keys(theirs, identity or {})
        if keys == []:
            found = ckpt.latest_checkpoint(run_dir)
            if found is None:
                logger.info("--load auto: %s (this config's newest run) has no checkpoint: starting a new run",
                            run_dir)
                return None, None
            return run_dir, found
        if keys is not None:  # what cannot be resumed first: it says most about the difference
            blocking = _structural(keys, theirs, identity or {})
            keys = blocking + [k for k in keys if k not in blocking]
        others.append(f"{run_dir.name}: " + ("no record of its config" if keys is None else describe_keys(keys, 4)
                                             + " differ"))
    why = f" ({'; '.join(others)})" if others else ""
    logger.info("--load auto: no run of this config named %r in %s%s: starting a new run", name, outputs, why)
    return None, None


def _check_same_config(load: str, run_dir: Path, found: Path, identity: Dict[str, Any]) -> None:
    theirs = read_identity(run_dir)
    if theirs is None:
        logger.warning("--load %s: %s has no record of the config that made it (%s or config.py): resumed unchecked",
                       load, run_dir, IDENTITY_FILE)
        return
    keys = differing_keys(theirs, identity)
    if not keys:
        return
    blocking = _structural(keys, theirs, identity)
    if blocking:
        raise UserError(f"--load {load}: {run_dir.name} was made by another config ({describe_keys(blocking)} "
                        f"differ), whose checkpoint cannot resume this one; to start from its weights, use "
                        f"--ckpt-path {found}")
    logger.warning("--load %s: %s was made by another config (%s differ): resuming it with this one", load,
                   run_dir.name, describe_keys(keys))
