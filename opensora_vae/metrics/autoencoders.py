"""Video autoencoders behind one small interface, so any of them can be scored under one protocol (protocol.py,
eval/vae/eval_vae.py).

Interface (`VideoAutoencoder`): `reconstruct(video)` takes (B, C, T, H, W) in [-1, 1] and returns the same shape;
`frames_needed(T)` is the smallest length >= T the model's design accepts (4k+1, 8k+1, any length, ...); `name`,
`dtype`, `device`. What `reconstruct` does around the model, and why:
  - time: the clip is padded to `frames_needed(T)` by repeating its last frame (a causal VAE's extra frames then
    carry no new content; no frame is invented), reconstructed, then cropped back to its first T frames;
  - space: height and width are padded to multiples of the spatial compression by repeating the edge pixels
    (replicate), then cropped back; at the shipped protocols' 256x256 no model needs it;
  - latents: the posterior's mode (deterministic) by default, or one sample from a seeded generator
    (`posterior="sample"`, as the published Open-Sora table did);
  - a model that returns another frame count than it was fed is an error naming the rule to set (`frames=`):
    cropping such an output would silently compare shifted frames.

Spec syntax (one per `--vae`):

    opensora:PATH_OR_ID[,name=LABEL][,KEY=VALUE...]
    diffusers:CLASS=PATH_OR_ID[,subfolder=vae][,revision=REV][,variant=VAR][,name=LABEL][,frames=RULE]
                                [,tiling=true][,decode_timestep=FLOAT]

  `opensora:` loads through `VideoAutoencoderPipeline.from_pretrained` (the project's one loader: a published
  folder, a weights file beside its config.json, a trainer checkpoint or a hub id); other KEY=VALUE pairs go to it
  as config entries or runtime options (e.g. micro_frame_size=null, tiling=true; values are read as JSON, else
  kept as strings). It takes any clip length.
  `diffusers:` loads `getattr(diffusers, CLASS).from_pretrained(PATH_OR_ID, subfolder=...)`: a hub id or a local
  folder; `subfolder=vae` reads the VAE of a full pipeline's repo. `frames=` overrides the length rule
  (`4k+1`, `8k+1`, `8k`, `any`) for a class this module does not know or a config it misreads; `tiling=true`
  calls the model's `enable_tiling()`; `decode_timestep` is the LTX-Video decoder's timestep (models with
  timestep_conditioning; default 0.0, diffusers' pipeline default).
  `name=` labels the VAE in the report (default: `CLASS:last part of the path`, or `opensora:...`).

Known diffusers classes and their length rules (`DIFFUSERS_CLASSES`; checked on tiny random models in diffusers
0.42): CogVideoX 8k+1 (its temporal ratio is 4, but diffusers encodes 8-frame batches and decodes 2-latent
batches, so only an odd latent count decodes to 4(n-1)+1 frames), HunyuanVideo / HunyuanVideo 1.5 / Wan / LTX-Video
/ Cosmos: r*k+1 with r their temporal compression ratio (4, 4, 4, 8, 8 in the published configs), Mochi 6k+1,
AutoencoderKL (an image VAE): any length, frames folded into the batch. Any other class with a
`temporal_compression_ratio` is taken as causal (r*k+1); `frames=` overrides.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "DIFFUSERS_CLASSES",
    "VAE_KINDS",
    "DiffusersAutoencoder",
    "FrameRule",
    "OpenSoraAutoencoder",
    "VaeSpec",
    "VideoAutoencoder",
    "build_vae",
    "parse_vae_spec",
]


@dataclass(frozen=True)
class FrameRule:
    """Valid clip lengths `factor * k + offset` (k >= 0, length >= 1): offset 1 is a causal VAE's own first frame."""

    factor: int = 1
    offset: int = 0

    def needed(self, t: int) -> int:
        if t < 1:
            raise ValueError(f"a clip needs at least one frame, got {t}")
        if self.factor == 1:
            return t
        k = max(0, math.ceil((t - self.offset) / self.factor))
        n = self.factor * k + self.offset
        return n if n >= 1 else self.factor + self.offset

    def __str__(self) -> str:
        if self.factor == 1:
            return "any"
        return f"{self.factor}k+{self.offset}" if self.offset else f"{self.factor}k"

    @classmethod
    def parse(cls, text: str) -> "FrameRule":
        """'any', 'Nk' or 'Nk+M' (M < N)."""
        s = text.strip().lower().replace(" ", "")
        if s == "any":
            return cls()
        head, plus, tail = s.partition("+")
        try:
            if not head.endswith("k"):
                raise ValueError
            factor = int(head[:-1])
            offset = int(tail) if plus else 0
            if factor < 1 or not 0 <= offset < max(factor, 2):
                raise ValueError
        except ValueError:
            raise ValueError(f"frames={text!r} is not a length rule: use any, Nk or Nk+M (e.g. 4k+1, 8k+1)") from None
        return cls(factor, offset)


class VideoAutoencoder:
    """One VAE: `reconstruct((B, C, T, H, W) in [-1, 1]) -> same shape`; see the module docstring for the padding."""

    kind = "base"

    def __init__(self, name: str, model: torch.nn.Module, frame_rule: FrameRule, spatial_multiple: int,
                 posterior: str = "mode", info: Optional[Dict[str, Any]] = None):
        if posterior not in ("mode", "sample"):
            raise ValueError(f"posterior must be 'mode' or 'sample', got {posterior!r}")
        self.name, self.model, self.frame_rule = name, model, frame_rule
        self.spatial_multiple, self.posterior = max(1, int(spatial_multiple)), posterior
        self.info = dict(info or {})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def frames_needed(self, t: int) -> int:
        return self.frame_rule.needed(t)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> Dict[str, Any]:
        """What the report records about the model and how it was fed."""
        return dict(self.info, kind=self.kind, dtype=str(self.dtype).replace("torch.", ""), device=str(self.device),
                    posterior=self.posterior, frame_rule=str(self.frame_rule), spatial_multiple=self.spatial_multiple,
                    time_padding="repeat the last frame, crop back", space_padding="replicate edge, crop back",
                    parameters=self.num_parameters())

    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if video.ndim != 5:
            raise ValueError(f"expected a video (B, C, T, H, W), got shape {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        t_fed = self.frames_needed(t)
        m = self.spatial_multiple
        h_fed, w_fed = -(-h // m) * m, -(-w // m) * m
        x = video.to(device=self.device, dtype=self.dtype)
        if t_fed > t:
            x = torch.cat([x, x[:, :, -1:].expand(-1, -1, t_fed - t, -1, -1)], dim=2)
        if (h_fed, w_fed) != (h, w):
            # replicate pads the last two dims of a 5-D tensor as (W, H, T) pairs: T untouched
            x = F.pad(x, (0, w_fed - w, 0, h_fed - h, 0, 0), mode="replicate")
        out = self._reconstruct(x, generator)
        if out.shape[2] != t_fed or out.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"{self.name}: fed {t_fed} frames of {h_fed}x{w_fed} (rule {self.frame_rule}), got "
                f"{out.shape[2]} frames of {out.shape[-2]}x{out.shape[-1]} back; set the length rule in the spec, "
                f"e.g. frames=8k+1"
            )
        return out[:, :, :t, :h, :w]

    def _reconstruct(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        raise NotImplementedError


# ----- this project's pipeline ----------------------------------------------------------------------------------
class OpenSoraAutoencoder(VideoAutoencoder):
    kind = "opensora"

    def _reconstruct(self, x, generator):
        z = self.model.encode(x, sample_posterior=self.posterior == "sample", generator=generator)
        return self.model.decode(z, num_frames=x.shape[2])


def build_opensora(spec: "VaeSpec", device: torch.device, dtype: torch.dtype, posterior: str) -> OpenSoraAutoencoder:
    from opensora_vae.models.pipeline import VideoAutoencoderPipeline

    options = {k: _json_value(v) for k, v in spec.options.items() if k not in ("name", "frames")}
    try:
        model = VideoAutoencoderPipeline.from_pretrained(spec.source, torch_dtype=dtype, **options)
    except TypeError as e:  # an unknown option
        raise ValueError(f"--vae {spec.text}: {e}") from e
    model = model.to(device).eval()
    rule = FrameRule.parse(spec.options["frames"]) if "frames" in spec.options else FrameRule()
    info = dict(source=spec.source, loader="VideoAutoencoderPipeline.from_pretrained", options=options,
                micro_frame_size=model.micro_frame_size)
    return OpenSoraAutoencoder(spec.name, model, rule, model.spatial_vae.patch_size[1], posterior, info)


# ----- diffusers ------------------------------------------------------------------------------------------------
def _cfg(model, key, default=None):
    """An attribute the model set itself (LTX derives its ratios), else its config entry: never the deprecated
    attribute access to config entries that diffusers warns about."""
    value = vars(model).get(key)
    if value is None:
        value = getattr(model.config, key, None)
    return default if value is None else value


def _causal(ratio_key: str, spatial_key: str, spatial_default: int = 8):
    """Rule for classes whose config names the temporal and spatial ratios (attribute first: LTX derives them)."""
    def rule(model):
        return FrameRule(int(_cfg(model, ratio_key)), 1), int(_cfg(model, spatial_key, spatial_default)), False
    return rule


def _cogvideox(model):
    # 8-frame encoder batches, 2-latent decoder batches: an even latent count decodes to 4n frames (not 4n-3)
    ratio = int(_cfg(model, "temporal_compression_ratio", 4))
    return FrameRule(2 * ratio, 1), 2 ** (len(model.config.block_out_channels) - 1), False


def _wan(model):
    rule = FrameRule(int(_cfg(model, "scale_factor_temporal", 4)), 1)
    return rule, int(_cfg(model, "scale_factor_spatial", 8)), False


def _mochi(model):
    return (FrameRule(math.prod(model.config.temporal_expansions), 1), math.prod(model.config.spatial_expansions),
            False)


def _image_vae(model):
    return FrameRule(), 2 ** (len(model.config.block_out_channels) - 1), True


# class name -> model -> (length rule, spatial multiple, frames folded into the batch)
DIFFUSERS_CLASSES: Dict[str, Callable[[torch.nn.Module], Tuple[FrameRule, int, bool]]] = {
    "AutoencoderKLCogVideoX": _cogvideox,
    "AutoencoderKLHunyuanVideo": _causal("temporal_compression_ratio", "spatial_compression_ratio"),
    "AutoencoderKLHunyuanVideo15": _causal("temporal_compression_ratio", "spatial_compression_ratio", 16),
    "AutoencoderKLLTXVideo": _causal("temporal_compression_ratio", "spatial_compression_ratio", 32),
    "AutoencoderKLWan": _wan,
    "AutoencoderKLMochi": _mochi,
    "AutoencoderKLCosmos": _causal("temporal_compression_ratio", "spatial_compression_ratio"),
    "AutoencoderKL": _image_vae,
}


def _fallback_rule(model):
    ratio = _cfg(model, "temporal_compression_ratio")
    if ratio is None:
        raise ValueError(f"{type(model).__name__}: unknown temporal compression; give frames=RULE in the spec")
    return FrameRule(int(ratio), 1), int(_cfg(model, "spatial_compression_ratio", 8)), False


class DiffusersAutoencoder(VideoAutoencoder):
    kind = "diffusers"

    def __init__(self, *args, per_frame: bool = False, decode_timestep: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.per_frame, self.decode_timestep = per_frame, decode_timestep

    def _reconstruct(self, x, generator):
        b, t = x.shape[0], x.shape[2]
        if self.per_frame:  # an image VAE: every frame on its own
            x = x.transpose(1, 2).flatten(0, 1)
        enc = self.model.encode(x)
        dist = enc.latent_dist if hasattr(enc, "latent_dist") else enc[0]
        z = dist.sample(generator=generator) if self.posterior == "sample" else dist.mode()
        kwargs = {}
        if self.decode_timestep is not None:
            kwargs["temb"] = torch.full((z.shape[0],), self.decode_timestep, device=z.device, dtype=z.dtype)
        out = self.model.decode(z, **kwargs)
        out = out.sample if hasattr(out, "sample") else out[0]
        if self.per_frame:
            out = out.unflatten(0, (b, t)).transpose(1, 2)
        return out


_DIFFUSERS_OPTIONS = ("name", "subfolder", "revision", "variant", "frames", "tiling", "decode_timestep")


def _diffusers_class(spec: "VaeSpec"):
    """The class a diffusers spec names, its options checked: ValueError before anything loads."""
    import diffusers

    cls = getattr(diffusers, spec.class_name, None)
    if not (isinstance(cls, type) and hasattr(cls, "from_pretrained") and hasattr(cls, "encode")):
        known = ", ".join(sorted(DIFFUSERS_CLASSES))
        raise ValueError(f"--vae {spec.text}: diffusers {diffusers.__version__} has no autoencoder class "
                         f"{spec.class_name!r} (known: {known})")
    unknown = sorted(set(spec.options) - set(_DIFFUSERS_OPTIONS))
    if unknown:
        raise ValueError(f"--vae {spec.text}: unknown option(s) {unknown}; choose from {', '.join(_DIFFUSERS_OPTIONS)}")
    return cls


def build_diffusers(spec: "VaeSpec", device: torch.device, dtype: torch.dtype, posterior: str) -> DiffusersAutoencoder:
    cls = _diffusers_class(spec)
    load = {k: spec.options[k] for k in ("subfolder", "revision", "variant") if k in spec.options}
    try:
        model = cls.from_pretrained(spec.source, torch_dtype=dtype, **load)
    except (OSError, ValueError) as e:  # no such folder / repo / subfolder, or a config the class refuses
        reason = " ".join(str(e).split())[:400]
        raise ValueError(f"--vae {spec.text}: cannot load {spec.class_name} from {spec.source!r}: {reason}") from e
    model = model.to(device).eval()
    rule, spatial, per_frame = DIFFUSERS_CLASSES.get(spec.class_name, _fallback_rule)(model)
    if "frames" in spec.options:
        rule = FrameRule.parse(spec.options["frames"])
    if _json_value(spec.options.get("tiling", "false")) is True:
        model.enable_tiling()
    timestep = None
    if _cfg(model, "timestep_conditioning", False):
        timestep = float(spec.options.get("decode_timestep", 0.0))
    elif "decode_timestep" in spec.options:
        raise ValueError(f"--vae {spec.text}: decode_timestep needs a decoder with timestep_conditioning")
    info = dict(source=spec.source, class_name=spec.class_name, loader=f"diffusers.{spec.class_name}.from_pretrained",
                options={k: v for k, v in spec.options.items() if k != "name"}, per_frame=per_frame,
                decode_timestep=timestep, rule_source="spec" if "frames" in spec.options else (
                    "DIFFUSERS_CLASSES" if spec.class_name in DIFFUSERS_CLASSES else "temporal_compression_ratio"))
    return DiffusersAutoencoder(spec.name, model, rule, spatial, posterior, info, per_frame=per_frame,
                                decode_timestep=timestep)


# ----- specs and the registry -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VaeSpec:
    text: str
    kind: str
    source: str
    class_name: Optional[str] = None
    options: Dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if "name" in self.options:
            return self.options["name"]
        tail = os.path.basename(os.path.normpath(self.source)) or self.source
        return f"{self.class_name or self.kind}:{tail}"


# kind -> builder(spec, device, dtype, posterior) -> VideoAutoencoder
VAE_KINDS: Dict[str, Callable[..., VideoAutoencoder]] = {"opensora": build_opensora, "diffusers": build_diffusers}


def parse_vae_spec(text: str) -> VaeSpec:
    """`KIND:TARGET[,key=value...]` (module docstring); ValueError naming the problem."""
    usage = "use opensora:PATH_OR_ID or diffusers:CLASS=PATH_OR_ID, then optional ,key=value"
    kind, colon, rest = text.partition(":")
    if not colon or kind not in VAE_KINDS:
        raise ValueError(f"--vae {text!r}: unknown kind {kind!r}; {usage}")
    target, *pairs = rest.split(",")
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--vae {text!r}: option {pair!r} is not key=value; {usage}")
        options[key.strip()] = value.strip()
    class_name = None
    if kind == "diffusers":
        class_name, eq, target = target.partition("=")
        if not eq or not class_name.strip():
            raise ValueError(f"--vae {text!r}: diffusers needs CLASS=PATH_OR_ID; {usage}")
        class_name = class_name.strip()
    if not target.strip():
        raise ValueError(f"--vae {text!r}: no path or hub id; {usage}")
    if "frames" in options:
        FrameRule.parse(options["frames"])  # refuse a bad rule before any model loads
    spec = VaeSpec(text, kind, os.path.expanduser(target.strip()), class_name, options)
    if kind == "diffusers":
        _diffusers_class(spec)
    return spec


def build_vae(spec, device="cpu", dtype=torch.float32, posterior: str = "mode") -> VideoAutoencoder:
    """A `VideoAutoencoder` from a spec string or VaeSpec, on `device` in `dtype`, in eval mode."""
    spec = parse_vae_spec(spec) if isinstance(spec, str) else spec
    return VAE_KINDS[spec.kind](spec, torch.device(device), dtype, posterior)


def _json_value(text: str) -> Any:
    """Spec values as JSON where they parse (17, null, true), else the string itself (a path, a name)."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text
