"""What a job ran: the model a config asks for against the one its checkpoint (`model.from_pretrained`) gives.

A pipeline checkpoint brings its own structure (config.json), so `--ckpt-path` can build another model than the
config describes. `recorded_model_config` says so once, naming the keys, and returns the model entry that describes
what was built, for the job to save (training: the run's config.py; inference and encoding: their metadata)."""
from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any, Dict, List, Optional

import torch

from .models.autoencoders import DiffusersAutoencoder, OpenSoraAutoencoder
from .models.build import build_model
from .models.pipeline import VideoAutoencoderPipeline
from .models.spatial import SDXL_VAE_HUB_ID
from .models.speed import RUNTIME_OPTIONS
from .registry import MODELS, to_plain

logger = logging.getLogger("opensora_vae.provenance")

# Entries of a component dict that say where weights come from or how it runs, not what it is.
NOT_ARCHITECTURE = frozenset({"from_pretrained", "cache_dir", "local_files_only", "subfolder", "micro_batch_size"})


def absolute_if_local(value: Any) -> Any:
    """A local path as an absolute one, so that what a job records can be reopened from any folder (and the same job
    or run started from another folder is the same); anything else (a hub id, a spec string, None) as it is."""
    return os.path.abspath(os.path.expanduser(value)) if isinstance(value, str) and os.path.exists(value) else value


def flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and tuples are values (tuples as lists, as JSON has them)."""
    if isinstance(value, dict) and value:
        out: Dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.loads(json.dumps(value, default=str))}


def differing_keys(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    """Keys of two flat dicts whose values differ (a key present on one side only counts)."""
    return sorted(k for k in set(a) | set(b) if a.get(k, KeyError) != b.get(k, KeyError))


def describe_keys(keys: List[str], limit: int = 6) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _with_defaults(component: Dict[str, Any]) -> Dict[str, Any]:
    """A component dict with its registered type's unstated defaults filled in (so spellings compare alike)."""
    kind = MODELS.get(component.get("type", "")) if isinstance(component.get("type"), str) else None
    if kind is None:
        return component
    params = inspect.signature(kind).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**{k: v for k, v in defaults.items() if k not in NOT_ARCHITECTURE}, **component}


def model_description(model: torch.nn.Module) -> Optional[Dict[str, Any]]:
    """The structure of a built pipeline as a VideoAutoencoderPipeline model entry (what its config.json holds:
    the spatial VAE's AutoencoderKL config, the temporal VAE's type and arguments); None for other models."""
    if not isinstance(model, VideoAutoencoderPipeline):
        return None
    cfg = json.loads(json.dumps(to_plain(model.config), default=str))
    vae_2d = {k: v for k, v in cfg["vae_2d"].items() if k not in NOT_ARCHITECTURE}
    vae_2d.update(config=json.loads(json.dumps(model.spatial_vae.architecture_config(), default=str)),
                  scaling_factor=model.spatial_vae.scaling_factor)
    cfg["vae_2d"] = vae_2d
    cfg["vae_temporal"] = _with_defaults({k: v for k, v in cfg["vae_temporal"].items() if k not in NOT_ARCHITECTURE})
    return {"type": "VideoAutoencoderPipeline", **cfg}


def declared_model(model_cfg: Any) -> Optional[Dict[str, Any]]:
    """The description (`model_description`) of the model a config entry asks for, weights aside: built on the
    meta device (no memory, no download). None when it cannot be told offline. A spatial VAE given only as a hub
    id other than the SDXL VAE's has no known structure: its `config` is left out."""
    cfg = {k: v for k, v in to_plain(dict(model_cfg)).items() if k not in RUNTIME_OPTIONS and k != "from_pretrained"}
    vae_2d = dict(cfg.get("vae_2d") or {})
    default_source = SDXL_VAE_HUB_ID if cfg.get("type") == "OpenSoraVAE_V1_2" else None
    known_spatial = vae_2d.get("config") is not None or vae_2d.get("from_pretrained", default_source) in (
        None, SDXL_VAE_HUB_ID)
    cfg["vae_2d"] = dict(vae_2d, from_pretrained=None)  # no config: VideoAutoencoderKL builds the SDXL structure
    cfg["vae_temporal"] = dict(cfg.get("vae_temporal") or {}, from_pretrained=None)
    try:
        with torch.device("meta"):
            description = model_description(build_model(cfg))
    except Exception as err:  # noqa: BLE001 - a config that does not build here is judged by what was built
        logger.debug("cannot describe the config's model: %s", err)
        return None
    if description is not None and not known_spatial:
        description["vae_2d"].pop("config")
    return description


def _diffusers_entry(cfg: Dict[str, Any], vae: DiffusersAutoencoder) -> Dict[str, Any]:
    """The model entry that rebuilds a diffusers autoencoder (`models.build.build_autoencoder`): its class and
    source, absolute where local, with the spec's options; a randomly initialised one keeps the config's entry.
    (A checkpoint that replaced the config's entry was warned about when it was built: `models.build.model_entry`.)"""
    info = vae.info
    if info.get("source") is None:
        return cfg
    return {"type": f"diffusers:{info['class_name']}", "from_pretrained": absolute_if_local(info["source"]),
            **(info.get("options") or {})}


def recorded_model_config(model_cfg: Any, model: torch.nn.Module, log: bool = True) -> Dict[str, Any]:
    """The model entry that describes `model` (a pipeline, or a `VideoAutoencoder` of either kind), built from
    `model_cfg`. A diffusers autoencoder: its class and source (`_diffusers_entry`). A pipeline: without
    `from_pretrained`, or when the checkpoint's structure is the one the config states, the config's own entry.
    Otherwise the checkpoint's structure (with the entry's `from_pretrained` and runtime options), and one warning
    (when `log`: rank 0) naming the keys where config and checkpoint disagree. Training saves it in the run's
    config.py; inference and encoding record it the same way."""
    cfg = to_plain(dict(model_cfg))
    if isinstance(model, DiffusersAutoencoder):
        return _diffusers_entry(cfg, model)
    if isinstance(model, OpenSoraAutoencoder):
        model = model.model
    if not cfg.get("from_pretrained"):
        return cfg
    built, declared = model_description(model), declared_model(cfg)
    if built is None or declared is None:
        return cfg
    ours, theirs = flatten(declared, "model."), flatten(built, "model.")
    if "config" not in declared["vae_2d"]:  # the config does not state the spatial structure
        theirs = {k: v for k, v in theirs.items() if not k.startswith("model.vae_2d.config.")}
    keys = differing_keys(ours, theirs)
    if not keys:
        return cfg
    if log:
        logger.warning("the checkpoint %s holds another model than the config states (%s differ): the run uses and "
                       "records the checkpoint's", cfg["from_pretrained"], describe_keys(keys))
    runtime = {k: v for k, v in cfg.items() if k in RUNTIME_OPTIONS}
    return {**built, "from_pretrained": cfg["from_pretrained"], **runtime}
