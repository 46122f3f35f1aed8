"""mmengine registries, one per kind of component, and the helpers that build from config dicts."""
from __future__ import annotations

import inspect
from typing import Any

from mmengine.config import Config, ConfigDict
from mmengine.registry import Registry

MODELS = Registry("model", scope="opensora_vae")
DATASETS = Registry("dataset", scope="opensora_vae")


def to_plain(cfg: Any) -> Any:
    """ConfigDict / Config -> plain dicts and lists, recursively (safe to mutate and to JSON-dump)."""
    if isinstance(cfg, Config):
        cfg = cfg.to_dict()
    if isinstance(cfg, (dict, ConfigDict)):
        return {k: to_plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(to_plain(v) for v in cfg) if isinstance(cfg, list) else tuple(to_plain(v) for v in cfg)
    return cfg


def build_from_cfg(cfg: Any, registry: Registry, **overrides: Any) -> Any:
    """Build a registered component from a dict with a `type` key; extra keyword arguments override the dict."""
    if cfg is None:
        return None
    cfg = to_plain(cfg)
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise TypeError(f"a {registry.name} config must be a dict with a 'type' key, got {cfg!r}")
    cfg.update(overrides)
    name = cfg.pop("type")
    obj = registry.get(name)
    if obj is None:
        known = ", ".join(sorted(registry.module_dict))
        raise KeyError(f"unknown {registry.name} type {name!r}; registered: {known}")
    return obj(**cfg)


def build_model(cfg: Any, **overrides: Any):
    """Build any registered model (VideoAutoencoderKL, VAE_Temporal, OpenSoraVAE_V1_2, ...) from its config dict.
    A pipeline dict's `from_pretrained` (folder, file, trainer checkpoint or hub id) loads the weights through the
    one loader (`models.pipeline.load_pipeline` -> `VideoAutoencoderPipeline.from_pretrained`). Then the runtime
    options (`models.speed.RUNTIME_OPTIONS`, never saved) of the dict and the keywords (which win) are applied; one
    the type's constructor takes (micro_batch_size of OpenSoraVAE_V1_2 / VideoAutoencoderKL: config.json) goes to
    it instead."""
    from .models.pipeline import PIPELINE_TYPES, load_pipeline
    from .models.speed import RUNTIME_OPTIONS, apply_runtime_options  # (also registers the model types)

    cfg, options = to_plain(cfg), {}
    if not isinstance(cfg, dict):
        return build_from_cfg(cfg, MODELS, **overrides)
    cfg = {**cfg, **to_plain(overrides)}
    model_type = MODELS.get(cfg["type"]) if "type" in cfg else None
    takes = inspect.signature(model_type).parameters if model_type is not None else {}
    options = {k: cfg.pop(k) for k in list(cfg) if k in RUNTIME_OPTIONS and k not in takes}
    weights = cfg.pop("from_pretrained", None) if cfg.get("type") in PIPELINE_TYPES else None
    model = load_pipeline(dict(cfg, from_pretrained=weights)) if weights else build_from_cfg(cfg, MODELS)
    return apply_runtime_options(model, **options)
