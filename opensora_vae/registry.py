"""mmengine registries, one per kind of component, and the generic helpers that build from config dicts. A leaf of
the package: the models and data sets register here; a model from a job's config: `models.build`."""
from __future__ import annotations

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
