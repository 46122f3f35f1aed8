"""mmengine registries, one per kind of component, and the helpers that build from config dicts."""
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


# Options build_model applies after construction through the model's enable_<name>() (never saved with it);
# False calls disable_<name>() where the model has one (`subpixel` is on by default).
RUNTIME_OPTIONS = ("compile", "winograd", "subpixel")


def build_model(cfg: Any, **overrides: Any):
    """Build any registered model (VideoAutoencoderKL, VAE_Temporal, OpenSoraVAE_V1_2, ...).

    Runtime options (in the dict or as keywords; not constructor arguments, never saved): `compile` (True or a
    dict of torch.compile options) calls `model.enable_compile(...)`, `winograd=True` `model.enable_winograd()`,
    `subpixel=False` `model.disable_subpixel()` (diffusers' own upsampling).
    """
    from . import models  # noqa: F401  (registers the model types)

    cfg = to_plain(cfg)
    options = {}
    for name in RUNTIME_OPTIONS:
        value = overrides.pop(name, cfg.pop(name, None) if isinstance(cfg, dict) else None)
        if value or value is False:
            options[name] = value
    model = build_from_cfg(cfg, MODELS, **overrides)
    for name, value in options.items():
        action = f"enable_{name}" if value else f"disable_{name}"
        if not hasattr(model, action):
            if not value:
                continue  # nothing to turn off
            raise TypeError(f"{type(model).__name__} has no {action}(); {name}={value!r} is not supported for it")
        getattr(model, action)(**(to_plain(value) if isinstance(value, dict) else {}))
    return model

