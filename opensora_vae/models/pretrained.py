"""The published checkpoint format: where the files are (folder, file or hub id) and strict loading."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..errors import RunError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
# Keys a transformers PretrainedConfig dump adds that are not constructor arguments (the published config.json also
# carries the reference's cal_loss and force_huggingface).
CONFIG_METADATA_KEYS = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "cal_loss",
                        "force_huggingface"}


def _weights_in(folder: Path) -> Optional[Path]:
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def resolve_pretrained(
    path_or_id: str, cache_dir: Optional[str] = None, local_files_only: bool = False
) -> Tuple[Optional[Path], Path]:
    """Find (config.json or None, weights file) for a published folder, a trainer checkpoint folder
    (with a `model/` subfolder), a weights file, or a hub id."""
    path = Path(os.path.expanduser(str(path_or_id)))
    if path.is_file():
        config = path.parent / CONFIG_NAME
        return (config if config.is_file() else None), path
    if path.is_dir():
        for folder in (path, path / "model"):
            weights = _weights_in(folder)
            if weights is not None:
                config = folder / CONFIG_NAME
                return (config if config.is_file() else None), weights
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {path} or {path / 'model'}: "
            f"expected a folder written by save_pretrained or a trainer checkpoint"
        )
    # "org/name" is a hub id unless "org" is a folder here (e.g. runs/model): then it is a local path that is missing.
    looks_local = (str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1
                   or path.parent.is_dir())
    if looks_local:
        raise FileNotFoundError(f"checkpoint {path_or_id} not found (neither a file, a folder nor a hub id)")
    return _download(str(path_or_id), cache_dir, local_files_only)


def hub_local_only(repo_id: str, filename: str = CONFIG_NAME, cache_dir: Optional[str] = None,
                   local_files_only: bool = False) -> bool:
    """Before a download from the Hugging Face hub: whether `repo_id` must be read from the local cache alone.
    One request with a short timeout and no retries (huggingface_hub retries a network error for about 30 s): False
    when the hub answers; True when it cannot be reached, or hub access is off (HF_HUB_OFFLINE, `local_files_only`),
    and `filename` is cached. Otherwise one line that names the model and the offline alternatives (RunError)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise FileNotFoundError(f"{repo_id} not found: neither a local path nor a hub id") from err
    folder_hint = (f"pass a local folder instead (`hf download {repo_id} --local-dir DIR` on a machine with access, "
                   f"then copy DIR here)")
    problem = "hub access is off (HF_HUB_OFFLINE or local_files_only)"
    if not (local_files_only or constants.HF_HUB_OFFLINE):
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=constants.HF_HUB_ETAG_TIMEOUT,
                                 retry_on_errors=False)
            return False
        except (RepositoryNotFoundError, RemoteEntryNotFoundError) as err:
            code = getattr(getattr(err, "response", None), "status_code", None)
            what = "no such model" if isinstance(err, RepositoryNotFoundError) else f"no file {filename} in it"
            raise RunError(f"{repo_id} is no local path, and the Hugging Face hub says {what} (HTTP {code}; a private "
                           f"or gated model needs `hf auth login`)") from err
        except HfHubHTTPError as err:
            problem = f"the Hugging Face hub answered HTTP {getattr(err.response, 'status_code', '?')}"
        except Exception as err:  # no network, DNS, proxy, timeout: whatever the HTTP client raises
            problem = f"the Hugging Face hub cannot be reached ({type(err).__name__})"
    try:
        hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=True)
        return True
    except Exception as err:  # not in the cache (or an invalid id): the one-line error below
        hint = folder_hint if problem.startswith("hub access is off") else (
            folder_hint + ", or run offline (HF_HUB_OFFLINE=1) with the files in the Hugging Face cache")
        raise RunError(f"{repo_id} is no local path, {problem}, and it is not in the Hugging Face cache: {hint}"
                       ) from err


def _download(repo_id: str, cache_dir, local_files_only) -> Tuple[Optional[Path], Path]:
    from huggingface_hub import hf_hub_download

    local = hub_local_only(repo_id, CONFIG_NAME, cache_dir, local_files_only)

    def fetch(name):
        return Path(hf_hub_download(repo_id, name, cache_dir=cache_dir, local_files_only=local))

    try:
        config = fetch(CONFIG_NAME)
        try:
            weights = fetch(WEIGHTS_NAME)
        except Exception:  # older uploads carry only the pickled state dict
            weights = fetch(LEGACY_WEIGHTS_NAME)
    except Exception as err:
        raise RunError(f"{repo_id}: getting its files from the Hugging Face hub failed ({type(err).__name__}: {err})"
                       ) from err
    return config, weights


def read_config(path: Path) -> dict:
    with open(path) as f:
        cfg = json.load(f)
    return {k: v for k, v in cfg.items() if k not in CONFIG_METADATA_KEYS and not k.startswith("_")}


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # Never an unrestricted unpickle: tensors and plain containers only.
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


class CheckpointMismatchError(KeyError, RunError):
    """Weights whose names or shapes do not fit the model (a user error: the wrong checkpoint or config)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _names(keys, limit=8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_strict(module: nn.Module, state_dict: Dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """load_state_dict(strict=True) with an error that names missing/unexpected keys and shape mismatches."""
    own = module.state_dict()
    missing = set(own) - set(state_dict)
    unexpected = set(state_dict) - set(own)
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:8])}")
        raise CheckpointMismatchError(f"checkpoint {source} does not fit {type(module).__name__}: " + " | ".join(parts))
    module.load_state_dict(state_dict, strict=True, assign=assign)


def load_state_dict_file(module: nn.Module, path: str, prefix: str = "") -> None:
    """Load a weights file into `module`; keys under `prefix` (a whole-pipeline file) are taken and stripped."""
    _, weights = resolve_pretrained(path)
    sd = read_state_dict(weights)
    if prefix and any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    load_strict(module, sd, str(weights))
