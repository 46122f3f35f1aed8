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

Config dicts (`build_autoencoder`, e.g. a config's `model=` entry), a diffusers class by its spec prefix:

    dict(type="diffusers:AutoencoderKLWan", config=dict(base_dim=8, z_dim=4, ...))   # random init from a config
    dict(type="diffusers:AutoencoderKLWan", from_pretrained=PATH_OR_ID, subfolder="vae")  # as the spec string

  with the spec's other options as keys (frames, tiling, decode_timestep, name, ...). This project's own models
  keep their registered types (`build_model`), and `as_autoencoder(model)` wraps what that builds.
"""
from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import diffusers
import torch
from torch import nn

from ..errors import UserError
from .autoencoders import (DIFFUSERS_CLASSES, DiffusersAutoencoder, FrameRule, OpenSoraAutoencoder, VideoAutoencoder,
                           diffusers_geometry)
from .pipeline import VideoAutoencoderPipeline

__all__ = ["VAE_KINDS", "VaeSpec", "as_autoencoder", "build_autoencoder", "load_autoencoder", "parse_vae_spec"]

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


def build_autoencoder(cfg: Dict[str, Any], device: Union[str, torch.device] = "cpu",
                      dtype: Optional[torch.dtype] = torch.float32, posterior: str = "mode") -> VideoAutoencoder:
    """A diffusers autoencoder from a config dict (module docstring): `config` builds it with random weights (seed
    torch first), `from_pretrained` loads it as the spec string would."""
    cfg = dict(cfg)
    kind, _, class_name = str(cfg.pop("type", "")).partition(":")
    if kind != "diffusers" or not class_name:
        raise UserError(f"model type {kind + (':' + class_name if class_name else '')!r}: a config dict names a "
                        f"diffusers class as type='diffusers:CLASS' (this project's models: build_model)")
    config, source = cfg.pop("config", None), cfg.pop("from_pretrained", None)
    if (config is None) == (source is None):
        raise UserError(f"model type 'diffusers:{class_name}': give either config=dict(...) (random weights) or "
                        f"from_pretrained=PATH_OR_ID")
    text = f"diffusers:{class_name}={source if source is not None else '<config>'}"
    spec = _checked(VaeSpec(text, "diffusers", None if source is None else os.path.expanduser(str(source)),
                            class_name, cfg, None if config is None else dict(config)))
    if config is not None:
        unknown = sorted(set(config) - set(inspect.signature(_diffusers_class(spec).__init__).parameters))
        if unknown:
            raise UserError(f"model type 'diffusers:{class_name}': unknown config key(s) {unknown}")
    return load_autoencoder(spec, device, dtype, posterior)


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
