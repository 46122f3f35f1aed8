"""Where a `VideoAutoencoder` (autoencoders.py) comes from: one spec string for every job (the evaluator's `--vae`,
the `--ckpt-path` of training, inference and encoding, a config's `model=`), a config dict for a randomly
initialised diffusers model, or a model already built.

Spec strings (`load_autoencoder`, `parse_vae_spec`):

    PATH_OR_ID
    opensora:PATH_OR_ID[,name=LABEL][,frames=RULE][,KEY=VALUE...]
    diffusers:CLASS=PATH_OR_ID[,subfolder=vae][,revision=REV][,variant=VAR][,cache_dir=DIR][,local_files_only=true]
                              [,name=LABEL][,frames=RULE][,tiling=true][,decode_timestep=FLOAT]

  A plain path or hub id is the project's own loader, `VideoAutoencoderPipeline.from_pretrained` (a published
  folder, a weights file beside its config.json, a trainer checkpoint or a hub id), unless the folder (or its
  `model/` subfolder, a trainer checkpoint's) holds a diffusers config (`_class_name`): then that class loads it.
  `opensora:` names that loader; its other KEY=VALUE pairs go to it as config entries or runtime options (e.g.
  micro_frame_size=null, tiling=true; values are read as JSON, else kept as strings).
  `diffusers:` loads `getattr(diffusers, CLASS).from_pretrained(PATH_OR_ID, subfolder=...)`: a hub id or a local
  folder; `subfolder=vae` reads the VAE of a full pipeline's repo. `frames=` sets the length rule (`4k+1`, `8k+1`,
  `8k`, `any`) for a class autoencoders.py does not know or a config it misreads; `tiling=true` calls the model's
  `enable_tiling()`; `decode_timestep` is the LTX-Video decoder's timestep (models with timestep_conditioning;
  default 0.0, diffusers' pipeline default). `name=` labels the model in reports (default `CLASS:last part of the
  path`, or `opensora:...`).
  An unknown kind, class or option, a bad rule or value, a local folder or `subfolder` that is not there: one line
  (`UserError`) before any weights load.

A config's `model` entry (`build_autoencoder`, the one way every job gets its model; `model_entry` writes it as a
dict, config.py checks it with `check_model_entry` before anything runs):

    "diffusers:AutoencoderKLWan=PATH,subfolder=vae"                                  # a spec string
    dict(type="diffusers:AutoencoderKLWan", config=dict(base_dim=8, z_dim=4, ...))   # random init from a config
    dict(type="diffusers:AutoencoderKLWan", from_pretrained=PATH_OR_ID, subfolder="vae")  # as the spec string
    dict(type="OpenSoraVAE_V1_2", from_pretrained=PATH_OR_ID, micro_frame_size=17, tiling=True)  # `build_model`

  A diffusers dict takes the spec's options as keys (frames, tiling, decode_timestep, name, ...); this project's
  own models keep their registered types and runtime options (`build_model`), and `as_autoencoder(model)` wraps
  what that builds. A `from_pretrained` (e.g. set by `--ckpt-path`) may itself be a spec string or a diffusers
  folder: the weights then decide the model. Of the same family it fills the entry (a diffusers checkpoint's own
  config.json replaces `config=`); of another family (a Wan checkpoint on an Open-Sora config, or the reverse) it
  replaces the entry, with one warning naming what was dropped (`provenance.py` records what was built).
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import diffusers
import torch
from torch import nn

from ..errors import UserError
from ..registry import MODELS, build_from_cfg, to_plain
from .autoencoders import (DIFFUSERS_CLASSES, DiffusersAutoencoder, FrameRule, OpenSoraAutoencoder, VideoAutoencoder,
                           diffusers_geometry)
from .pipeline import PIPELINE_TYPES, VideoAutoencoderPipeline, load_pipeline
from .speed import RUNTIME_OPTIONS, apply_runtime_options

__all__ = ["VAE_KINDS", "VaeSpec", "as_autoencoder", "build_autoencoder", "build_model", "check_model_entry",
           "load_autoencoder", "model_entry", "parse_vae_spec"]

# Job-wide (every rank builds alike): shown by rank 0 only, as provenance.py's (train/logging.py JOB_WIDE).
logger = logging.getLogger("opensora_vae.provenance")

_USAGE = "use PATH_OR_ID, opensora:PATH_OR_ID or diffusers:CLASS=PATH_OR_ID, then optional ,key=value"
_DIFFUSERS_LOAD = ("subfolder", "revision", "variant", "cache_dir", "local_files_only")
_DIFFUSERS_OPTIONS = ("name", "frames", "tiling", "decode_timestep") + _DIFFUSERS_LOAD
_KIND = re.compile(r"^([A-Za-z][\w-]+):(?!//)")  # "kind:", not a drive letter's "C:" nor a URL's "s3://"


@dataclass(frozen=True)
class VaeSpec:
    """What to load: `kind` ("opensora" or "diffusers"), `source` (path or hub id; None with `config`: random init
    from that diffusers config), `class_name` (diffusers) and the options."""

    text: str
    kind: str
    source: Optional[str]
    class_name: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)
    config: Optional[Dict[str, Any]] = None

    @property
    def name(self) -> str:
        if "name" in self.options:
            return str(self.options["name"])
        if self.source is None:
            return f"{self.class_name}:random"
        tail = os.path.basename(os.path.normpath(self.source)) or self.source
        return f"{self.class_name or self.kind}:{tail}"


def _json_value(text: Any) -> Any:
    """Spec values as JSON where they parse (17, null, true), else the string itself (a path, a name)."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def _split_options(text: str, pairs) -> Dict[str, str]:
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise UserError(f"VAE spec {text!r}: option {pair!r} is not key=value; {_USAGE}")
        options[key.strip()] = value.strip()
    return options


def _diffusers_config(folder: Path) -> Optional[Dict[str, Any]]:
    """A diffusers model config.json in `folder` (it names its `_class_name`), else None."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and "_class_name" in config else None


def _plain_path(text: str) -> VaeSpec:
    """A path or hub id: a diffusers folder (or a trainer checkpoint's model/ of one) by its config, else the
    project's pipeline."""
    path = Path(os.path.expanduser(text))
    for sub in ("", "model"):
        config = _diffusers_config(path / sub) if path.is_dir() else None
        if config is not None:
            options = {"subfolder": sub} if sub else {}
            return _checked(VaeSpec(text, "diffusers", str(path), config["_class_name"], options))
    return VaeSpec(text, "opensora", str(path))


def parse_vae_spec(text: str) -> VaeSpec:
    """A spec string (module docstring), checked: UserError naming the problem, before anything loads."""
    text = str(text)
    match = _KIND.match(text)
    if match is None or os.path.exists(os.path.expanduser(text)):
        if not text.strip():
            raise UserError(f"VAE spec {text!r}: no path or hub id; {_USAGE}")
        return _plain_path(text)
    kind, rest = match.group(1), text[match.end():]
    if kind not in VAE_KINDS:
        raise UserError(f"VAE spec {text!r}: unknown kind {kind!r}; {_USAGE}")
    target, *pairs = rest.split(",")
    options = _split_options(text, pairs)
    class_name = None
    if kind == "diffusers":
        class_name, eq, target = target.partition("=")
        if not eq or not class_name.strip():
            raise UserError(f"VAE spec {text!r}: diffusers needs CLASS=PATH_OR_ID; {_USAGE}")
        class_name = class_name.strip()
    if not target.strip():
        raise UserError(f"VAE spec {text!r}: no path or hub id; {_USAGE}")
    return _checked(VaeSpec(text, kind, os.path.expanduser(target.strip()), class_name, options))


def _checked(spec: VaeSpec) -> VaeSpec:
    if "frames" in spec.options:
        FrameRule.parse(spec.options["frames"])
    if spec.kind == "diffusers":
        _diffusers_class(spec)
        _check_diffusers_options(spec)
        _check_local_folder(spec)
    return spec


def _diffusers_class(spec: VaeSpec) -> type:
    cls = getattr(diffusers, spec.class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin) and hasattr(cls, "encode")
            and hasattr(cls, "decode")):
        known = ", ".join(sorted(DIFFUSERS_CLASSES))
        raise UserError(f"VAE spec {spec.text!r}: diffusers {diffusers.__version__} has no autoencoder class "
                        f"{spec.class_name!r} (known: {known})")
    return cls


def _check_diffusers_options(spec: VaeSpec) -> None:
    unknown = sorted(set(spec.options) - set(_DIFFUSERS_OPTIONS))
    if unknown:
        raise UserError(f"VAE spec {spec.text!r}: unknown option(s) {unknown}; choose from "
                        f"{', '.join(_DIFFUSERS_OPTIONS)}")
    for key in ("tiling", "local_files_only"):
        if key in spec.options and not isinstance(_json_value(spec.options[key]), bool):
            raise UserError(f"VAE spec {spec.text!r}: {key} must be true or false, got {spec.options[key]!r}")
    if "decode_timestep" in spec.options and not isinstance(_json_value(spec.options["decode_timestep"]),
                                                            (int, float)):
        raise UserError(f"VAE spec {spec.text!r}: decode_timestep must be a number, got "
                        f"{spec.options['decode_timestep']!r}")


def _check_local_folder(spec: VaeSpec) -> None:
    """A local source: the folder (and subfolder) holds a config of the named class."""
    if spec.source is None:
        return
    root = Path(spec.source)
    if not root.is_dir():
        if spec.source.startswith((".", "/", "~")) or spec.source.count("/") != 1 or root.parent.is_dir():
            raise UserError(f"VAE spec {spec.text!r}: {spec.source} is neither a folder here nor a hub id")
        return  # a hub id: diffusers reports what it cannot find
    sub = spec.options.get("subfolder") or ""
    folder = root / sub
    if not folder.is_dir():
        there = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise UserError(f"VAE spec {spec.text!r}: no subfolder {sub!r} in {root} (subfolders there: "
                        f"{', '.join(there) or 'none'})")
    config = _diffusers_config(folder)
    if config is None:
        raise UserError(f"VAE spec {spec.text!r}: {folder} holds no diffusers config.json")
    if config["_class_name"] != spec.class_name:
        raise UserError(f"VAE spec {spec.text!r}: {folder} holds a {config['_class_name']}, not a {spec.class_name}")


# ----- loading -----------------------------------------------------------------------------------------------------
def _load_opensora(spec: VaeSpec, device: torch.device, dtype: Optional[torch.dtype],
                   posterior: str) -> OpenSoraAutoencoder:
    options = {k: _json_value(v) for k, v in spec.options.items() if k not in ("name", "frames")}
    try:
        model = VideoAutoencoderPipeline.from_pretrained(spec.source, torch_dtype=dtype, **options)
    except TypeError as e:  # an unknown option
        raise UserError(f"VAE spec {spec.text!r}: {e}") from e
    info = dict(source=spec.source, loader="VideoAutoencoderPipeline.from_pretrained", options=options)
    return as_autoencoder(model.to(device).eval(), spec.name, posterior, spec.options.get("frames"), info)


def _load_diffusers(spec: VaeSpec, device: torch.device, dtype: Optional[torch.dtype],
                    posterior: str) -> DiffusersAutoencoder:
    cls = _diffusers_class(spec)
    if spec.source is None:
        model = cls.from_config(spec.config)
        model = model.to(dtype=dtype) if dtype not in (None, model.dtype) else model
        loader = f"diffusers.{spec.class_name}.from_config"
    else:
        load = {k: _json_value(spec.options[k]) if k == "local_files_only" else spec.options[k]
                for k in _DIFFUSERS_LOAD if k in spec.options}
        try:
            model = cls.from_pretrained(spec.source, torch_dtype=dtype, **load)
        except (OSError, ValueError) as e:  # no such repo / subfolder / revision, or a config the class refuses
            reason = " ".join(str(e).split())[:400]
            raise UserError(f"VAE spec {spec.text!r}: cannot load {spec.class_name} from {spec.source!r}: "
                            f"{reason}") from e
        loader = f"diffusers.{spec.class_name}.from_pretrained"
    model = model.to(device).eval()
    info = dict(source=spec.source, class_name=spec.class_name, loader=loader,
                options={k: v for k, v in spec.options.items() if k != "name"})
    return as_autoencoder(model, spec.name, posterior, spec.options.get("frames"), info,
                          decode_timestep=spec.options.get("decode_timestep"),
                          tiling=_json_value(spec.options.get("tiling", "false")) is True)


# kind -> loader(spec, device, dtype, posterior) -> VideoAutoencoder
VAE_KINDS: Dict[str, Callable[..., VideoAutoencoder]] = {"opensora": _load_opensora, "diffusers": _load_diffusers}


def load_autoencoder(spec: Union[str, VaeSpec], device: Union[str, torch.device] = "cpu",
                     dtype: Optional[torch.dtype] = torch.float32, posterior: str = "mode",
                     **options: Any) -> VideoAutoencoder:
    """A `VideoAutoencoder` from a spec string (module docstring), a plain path / hub id or a VaeSpec, on `device`
    in `dtype` (None: as saved), in eval mode. `options`: spec options given as keywords (they win)."""
    spec = parse_vae_spec(spec) if not isinstance(spec, VaeSpec) else spec
    if options:
        spec = _checked(VaeSpec(spec.text, spec.kind, spec.source, spec.class_name, {**spec.options, **options},
                                spec.config))
    return VAE_KINDS[spec.kind](spec, torch.device(device), dtype, posterior)


def build_model(cfg: Any, **overrides: Any):
    """Build any registered model (VideoAutoencoderKL, VAE_Temporal, OpenSoraVAE_V1_2, a discriminator, ...) from its
    config dict. A pipeline dict's `from_pretrained` (folder, file, trainer checkpoint or hub id) loads the weights
    through the one loader (`pipeline.load_pipeline` -> `VideoAutoencoderPipeline.from_pretrained`). Then the runtime
    options (`speed.RUNTIME_OPTIONS`, never saved) of the dict and the keywords (which win) are applied; one the
    type's constructor takes (micro_batch_size of OpenSoraVAE_V1_2 / VideoAutoencoderKL: config.json) goes to it
    instead. A job's model entry of any family: `build_autoencoder`."""
    cfg = to_plain(cfg)
    if not isinstance(cfg, dict):
        return build_from_cfg(cfg, MODELS, **overrides)
    cfg = {**cfg, **to_plain(overrides)}
    model_type = MODELS.get(cfg["type"]) if "type" in cfg else None
    takes = inspect.signature(model_type).parameters if model_type is not None else {}
    options = {k: cfg.pop(k) for k in list(cfg) if k in RUNTIME_OPTIONS and k not in takes}
    weights = cfg.pop("from_pretrained", None) if cfg.get("type") in PIPELINE_TYPES else None
    model = load_pipeline(dict(cfg, from_pretrained=weights)) if weights else build_from_cfg(cfg, MODELS)
    return apply_runtime_options(model, **options)


# ----- a config's model entry -------------------------------------------------------------------------------------
_ENTRY_KEYS = ("type", "config", "from_pretrained") + _DIFFUSERS_OPTIONS
# what an Open-Sora entry keeps when a checkpoint of another family replaces it (the one option both take)
_KEPT_ACROSS_FAMILIES = ("tiling",)


def _is_diffusers_entry(cfg: Mapping[str, Any]) -> bool:
    return str(cfg.get("type", "")).startswith("diffusers:")


def _names_a_spec(source: Any, cfg: Mapping[str, Any]) -> bool:
    """A `from_pretrained` value that says its own family: a spec string (`kind:...`, not a path that exists), a
    diffusers folder, or (on a diffusers entry) a local path without a diffusers config in the entry's subfolder
    (a pipeline's folder replaces the entry)."""
    if not isinstance(source, str) or not source:
        return False
    path = Path(os.path.expanduser(source))
    if not path.exists():
        return _KIND.match(source) is not None
    if _is_diffusers_entry(cfg):
        return not (path.is_dir() and _diffusers_config(path / str(cfg.get("subfolder") or "")))
    return path.is_dir() and any(_diffusers_config(path / sub) for sub in ("", "model"))


def _spec_dict(spec: VaeSpec) -> Dict[str, Any]:
    """A parsed spec as a model entry dict."""
    if spec.kind == "diffusers":
        return {"type": f"diffusers:{spec.class_name}", "from_pretrained": spec.source, **spec.options}
    options = {k: _json_value(v) for k, v in spec.options.items() if k not in ("name", "frames")}
    return {"type": "VideoAutoencoderPipeline", "from_pretrained": spec.source, **options}


def model_entry(cfg: Any, log: bool = True) -> Dict[str, Any]:
    """A config's `model` entry (module docstring) as the dict that says what is built: a spec string as a dict, and
    a `from_pretrained` spec or diffusers folder resolved. Of the entry's family it fills the entry; of another it
    replaces the entry, with one warning (when `log`) naming the keys that no longer apply. Checks the spec (one
    line, `UserError`), loads nothing."""
    if isinstance(cfg, (str, os.PathLike)):
        return _spec_dict(parse_vae_spec(str(cfg)))
    cfg = to_plain(dict(cfg))
    source, diffusers_entry = cfg.get("from_pretrained"), _is_diffusers_entry(cfg)
    if not (diffusers_entry or cfg.get("type", "VideoAutoencoderPipeline") in PIPELINE_TYPES) \
            or not _names_a_spec(source, cfg):
        return cfg
    entry = _spec_dict(parse_vae_spec(source))
    if entry["type"] == cfg.get("type") or not (diffusers_entry or _is_diffusers_entry(entry)):  # the same family
        merged = {**cfg, **{k: v for k, v in entry.items() if k != "type"}}
        if diffusers_entry:
            merged.pop("config", None)  # the checkpoint's own config.json is the structure
        return merged
    kept = {k: cfg[k] for k in _KEPT_ACROSS_FAMILIES if k in cfg}
    dropped = sorted(k for k in cfg if k not in kept and k not in ("type", "from_pretrained"))
    if log:
        logger.warning("model.from_pretrained %s is a %s model: it replaces the config's %s entry%s", source,
                       entry["type"], cfg.get("type", "model"),
                       f" ({', '.join('model.' + k for k in dropped)} do not apply)" if dropped else "")
    return {**entry, **kept}


def check_model_entry(cfg: Any, where: str = "model.") -> Dict[str, Any]:
    """A model entry checked without loading weights: a spec string parsed (class, options, local folder and
    subfolder); a diffusers entry's keys and options, its class and a `config`'s keys against the class's arguments;
    a `from_pretrained` that names its own family (a spec string or a diffusers folder) parsed too. Raises UserError
    (one line naming the key); returns the entry as a dict (spec strings as dicts, nothing else resolved).
    A registered type's arguments are config.py's to check."""
    entry = model_entry(cfg, log=False) if isinstance(cfg, (str, os.PathLike)) else to_plain(dict(cfg))
    diffusers_entry = _is_diffusers_entry(entry)
    if diffusers_entry:
        class_name = entry["type"].partition(":")[2]
        for key in entry:
            if key not in _ENTRY_KEYS:
                hint = ("a runtime option of the Open-Sora pipeline; " if key in RUNTIME_OPTIONS else "") + \
                    f"{entry['type']} takes {', '.join(k for k in _ENTRY_KEYS if k != 'type')}"
                raise UserError(f"unknown config key '{where}{key}': {hint}")
        if not isinstance(entry.get("config", {}), Mapping):
            raise UserError(f"config key {where}config must be a dict of {class_name}'s arguments")
    source = entry.get("from_pretrained")
    if _names_a_spec(source, entry):
        parse_vae_spec(source)
        if diffusers_entry:  # the class and options, the weights' folder aside
            _diffusers_spec({**entry, "from_pretrained": None, "config": entry.get("config") or {}})
    elif diffusers_entry:
        _diffusers_spec(entry)
    return entry


def _diffusers_spec(cfg: Mapping[str, Any]) -> VaeSpec:
    """A diffusers entry as a checked spec: a class diffusers has, known options, `config`'s keys its arguments."""
    cfg = dict(cfg)
    kind, _, class_name = str(cfg.pop("type", "")).partition(":")
    if kind != "diffusers" or not class_name:
        raise UserError(f"model type {kind + (':' + class_name if class_name else '')!r}: a config dict names a "
                        f"diffusers class as type='diffusers:CLASS' (this project's models: build_model)")
    config, source = cfg.pop("config", None), cfg.pop("from_pretrained", None)
    if source is not None:
        config = None  # the checkpoint's own config.json is the structure
    elif config is None:
        raise UserError(f"model type 'diffusers:{class_name}': give either config=dict(...) (random weights) or "
                        f"from_pretrained=PATH_OR_ID")
    if "tiling" in cfg and isinstance(cfg["tiling"], Mapping):  # tile size and overlap: VideoAutoencoder.enable_tiling
        cfg.pop("tiling")
    text = f"diffusers:{class_name}={source if source is not None else '<config>'}"
    spec = _checked(VaeSpec(text, "diffusers", None if source is None else os.path.expanduser(str(source)),
                            class_name, cfg, None if config is None else dict(config)))
    if config is not None:
        unknown = sorted(set(config) - set(inspect.signature(_diffusers_class(spec).__init__).parameters))
        if unknown:
            raise UserError(f"model type 'diffusers:{class_name}': unknown config key(s) {unknown}")
    return spec


def _registered(entry: Mapping[str, Any]) -> None:
    """A registered type (one line otherwise; a diffusers class named without its prefix says so)."""
    name = entry.get("type")
    if name is None:
        raise UserError(f"model entry {dict(entry)!r} has no type: a registered type, type='diffusers:CLASS' or a "
                        f"spec string")
    if MODELS.get(name) is not None:
        return
    hint = f"; a diffusers class is type='diffusers:{name}'" if isinstance(getattr(diffusers, str(name), None), type) \
        else ""
    raise UserError(f"unknown model type {name!r} (registered: {', '.join(sorted(MODELS.module_dict))}){hint}")


def build_autoencoder(cfg: Any, device: Union[str, torch.device] = "cpu",
                      dtype: Optional[torch.dtype] = torch.float32, posterior: str = "mode",
                      log: bool = True) -> VideoAutoencoder:
    """THE model of every job: a `VideoAutoencoder` from a config's `model` entry (module docstring: a spec string, a
    diffusers dict, a registered Open-Sora type with `from_pretrained` and runtime options, a `from_pretrained` spec
    that decides the family), on `device` in `dtype` (None: as built), in eval mode. A diffusers `config=` builds
    random weights (seed torch first). `log`: warn when a checkpoint replaces the entry (rank 0)."""
    if isinstance(cfg, VideoAutoencoder):
        return cfg
    entry = model_entry(cfg, log=log)
    if not _is_diffusers_entry(entry):
        _registered(entry)
        model = build_model(entry)
        model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
        info = dict(source=entry.get("from_pretrained"), loader="build_model", type=entry.get("type"))
        return as_autoencoder(model.eval(), posterior=posterior, info=info)
    tiling = entry.pop("tiling") if isinstance(entry.get("tiling"), Mapping) else None  # --tile-size, --tile-overlap
    vae = load_autoencoder(_diffusers_spec(entry), device, dtype, posterior)
    if tiling is not None:
        vae.enable_tiling(**tiling)
    return vae


def as_autoencoder(model: nn.Module, name: Optional[str] = None, posterior: str = "mode",
                   frames: Optional[str] = None, info: Optional[Dict[str, Any]] = None,
                   decode_timestep: Optional[Any] = None, tiling: bool = False) -> VideoAutoencoder:
    """Wrap a built model: a VideoAutoencoderPipeline or a diffusers autoencoder. `frames`: a length rule that
    replaces the class's own."""
    if isinstance(model, VideoAutoencoder):
        return model
    rule = None if frames is None else FrameRule.parse(frames)
    name = name or type(model).__name__
    if isinstance(model, VideoAutoencoderPipeline):
        return OpenSoraAutoencoder(name, model, posterior, info, frame_rule=rule)
    if not isinstance(model, diffusers.ModelMixin) or not hasattr(model, "encode"):
        raise UserError(f"{type(model).__name__} is not a video autoencoder this project knows (a "
                        f"VideoAutoencoderPipeline or a diffusers autoencoder)")
    geometry = diffusers_geometry(model, rule)
    conditioned = bool(model.config.get("timestep_conditioning", False))
    if decode_timestep is not None and not conditioned:
        raise UserError(f"{name}: decode_timestep needs a decoder with timestep_conditioning")
    timestep = float(_json_value(decode_timestep) or 0.0) if conditioned else None
    info = dict(info or {}, per_frame=geometry.per_frame, decode_timestep=timestep,
                rule_source="spec" if rule is not None else (
                    "DIFFUSERS_CLASSES" if type(model).__name__ in DIFFUSERS_CLASSES else "temporal_compression_ratio"))
    vae = DiffusersAutoencoder(name, model, geometry, posterior, info, decode_timestep=timestep)
    if tiling:
        vae.enable_tiling()
    return vae
