"""Any video autoencoder behind one interface (`VideoAutoencoder`): this project's pipeline and diffusers' video
VAEs (AutoencoderKLWan, AutoencoderKLCogVideoX, AutoencoderKLLTXVideo, AutoencoderKLHunyuanVideo, ...), for every
job: training, inference, latent encoding and evaluation. Loading from a spec string, a path or a config dict:
`build.py`.

A `VideoAutoencoder` is an `nn.Module` holding the model as `.model` (a trainer may wrap it in DDP; its state dict
is the model's under the prefix `model.`). Videos are (B, C, T, H, W) in [-1, 1].

  - `encode(x) -> DiagonalGaussianDistribution` (models/distributions.py: mean, std, logvar, sample(generator),
    mode(), kl()): the model's own posterior, BEFORE any latent normalisation, mean and std bit-equal to the
    model's (diffusers: `encode(x).latent_dist`; the Open-Sora pipeline: its temporal posterior given the spatial
    VAE's mean, i.e. `encode_posterior` before its shift/scale). `decode(z, num_frames)`: un-normalised latents to
    a video of `num_frames` frames (the model's own decode). `forward(x, sample_posterior, generator)`: the
    training pass, `AutoencoderOutput(reconstruction, posterior, z, native)` (no loss inside; `native` is the
    model's own output, e.g. the pipeline's PipelineOutput for the Open-Sora-only terms, else None).
  - `latent_normalization`: what diffusion training applies to the latents, `(z - shift) / scale` per channel
    (`normalize` / `denormalize`), with the model's own entries it came from under "source": Wan's latents_mean /
    latents_std; LTX's latents_mean / latents_std and scaling_factor (scale = std / scaling_factor); CogVideoX /
    HunyuanVideo's scaling_factor (scale = 1 / scaling_factor) and shift_factor where set; the Open-Sora pipeline's
    shift / scale (its `encode` returns `normalize(posterior sample)`).
  - geometry: `frame_rule` (valid clip lengths, `check_frames(t)` refuses others in one line), `temporal_compression`,
    `spatial_compression`, `latent_channels`; `has_spatial_path` (the Open-Sora pipeline decodes with its spatial VAE
    alone: `spatial_reconstruction`).
  - training: `encoder_modules()` / `decoder_modules()` split every trainable parameter into exactly one side
    (`check_sides`, `freeze_encoder` for decoder-only training); `last_decoder_weight()` for the adaptive GAN weight;
    gradient checkpointing and tiling toggles delegated to the model.
  - `save_pretrained(folder, state_dict=None)` writes the model's own format (what its class's `from_pretrained`
    loads; `state_dict`, e.g. an EMA's, with or without the `model.` prefix); `spec_for(folder)` is the spec that
    loads it back.

`reconstruct(video, generator)` (evaluation, inference) runs the model's own encode -> decode around padding:
  - time: padded to `frames_needed(T)` by repeating the last frame (a causal VAE's extra frames then carry no new
    content; no frame is invented), cropped back to the clip's first T frames;
  - space: height and width padded to multiples of the spatial compression by repeating the edge pixels, cropped
    back;
  - latents: the posterior's mode by default, or one sample from a seeded generator (`posterior="sample"`; the
    Open-Sora pipeline then samples its spatial latents too, as the published table did);
  - a model that returns another frame count than it was fed is an error naming the rule to set (`frames=`):
    cropping such an output would silently compare shifted frames.

Length rules of the known diffusers classes (`DIFFUSERS_CLASSES`; checked on tiny random models in diffusers 0.42):
CogVideoX 8k+1 (its temporal ratio is 4, but diffusers encodes 8-frame batches and decodes 2-latent batches, so only
an odd latent count decodes to 4(n-1)+1 frames), HunyuanVideo / HunyuanVideo 1.5 / Wan / LTX-Video / Cosmos: r*k+1
with r their temporal compression (4, 4, 4, 8, 8 in the published configs), Mochi 6k+1, AutoencoderKL (an image
VAE): any length, frames folded into the batch. Any other class with a `temporal_compression_ratio` is taken as
causal (r*k+1); the spec's `frames=` overrides. The Open-Sora pipeline takes any length (its temporal VAE pads).
"""
from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .distributions import DiagonalGaussianDistribution
from .pretrained import load_strict, read_state_dict, resolve_pretrained

__all__ = [
    "DIFFUSERS_CLASSES", "AutoencoderOutput", "DiffusersAutoencoder", "FrameRule", "Geometry", "OpenSoraAutoencoder",
    "VideoAutoencoder", "diffusers_geometry",
]


@dataclass(frozen=True)
class FrameRule:
    """Valid clip lengths `factor * k + offset` (k >= 0, length >= 1): offset 1 is a causal VAE's own first frame."""

    factor: int = 1
    offset: int = 0

    def needed(self, t: int) -> int:
        """The smallest valid length >= t."""
        if t < 1:
            raise ValueError(f"a clip needs at least one frame, got {t}")
        if self.factor == 1:
            return t
        k = max(0, math.ceil((t - self.offset) / self.factor))
        n = self.factor * k + self.offset
        return n if n >= 1 else self.factor + self.offset

    def valid(self, t: int) -> bool:
        return t >= 1 and self.needed(t) == t

    def __str__(self) -> str:
        if self.factor == 1:
            return "any"
        return f"{self.factor}k+{self.offset}" if self.offset else f"{self.factor}k"

    @classmethod
    def parse(cls, text: str) -> "FrameRule":
        """'any', 'Nk' or 'Nk+M' (M < N)."""
        s = str(text).strip().lower().replace(" ", "")
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
            raise UserError(f"frames={text!r} is not a length rule: use any, Nk or Nk+M (e.g. 4k+1, 8k+1)") from None
        return cls(factor, offset)


@dataclass(frozen=True)
class Geometry:
    """How a model maps clips to latents: valid lengths, compression in time and space, and whether an image VAE's
    frames are folded into the batch."""

    frame_rule: FrameRule
    temporal: int
    spatial: int
    per_frame: bool = False


class AutoencoderOutput(NamedTuple):
    reconstruction: Optional[torch.Tensor]
    posterior: DiagonalGaussianDistribution
    z: torch.Tensor  # the latents the decoder got (a posterior sample or its mode), before normalisation
    native: Any = None  # the model's own output (the pipeline's PipelineOutput), None where it has none


class VideoAutoencoder(nn.Module):
    """One video VAE; see the module docstring. Subclasses fill in the model-specific parts."""

    kind = "base"

    def __init__(self, name: str, model: nn.Module, geometry: Geometry, posterior: str = "mode",
                 info: Optional[Dict[str, Any]] = None):
        super().__init__()
        if posterior not in ("mode", "sample"):
            raise UserError(f"posterior must be 'mode' or 'sample', got {posterior!r}")
        self.model, self.geometry = model, geometry
        self.name, self.posterior = name, posterior  # posterior: what `reconstruct` decodes
        self.info = dict(info or {})

    # ----- geometry ----------------------------------------------------------------------------------------------
    @property
    def frame_rule(self) -> FrameRule:
        return self.geometry.frame_rule

    @property
    def temporal_compression(self) -> int:
        return self.geometry.temporal

    @property
    def spatial_compression(self) -> int:
        return self.geometry.spatial

    spatial_multiple = spatial_compression  # the evaluator's word for it

    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    has_spatial_path = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def frames_needed(self, t: int) -> int:
        return self.frame_rule.needed(t)

    def check_frames(self, t: int) -> None:
        """Refuse (one line, naming the rule) a clip length the model cannot take as it is."""
        if not self.frame_rule.valid(t):
            rule, up = self.frame_rule, self.frame_rule.needed(max(t, 1))
            down = up - rule.factor
            near = f"{down} or {up}" if down >= 1 else str(up)
            examples = ", ".join(str(n) for n in range(rule.offset or rule.factor, 4 * rule.factor, rule.factor))
            raise UserError(f"{self.name} takes clips of {rule} frames ({examples}, ...): {t} frames does not "
                            f"fit; use {near}")

    def check_size(self, height: int, width: int) -> None:
        """Refuse (one line) a frame size that is not a multiple of the spatial compression."""
        m = self.spatial_compression
        if height % m or width % m:
            raise UserError(f"{self.name} needs height and width multiples of {m} (its spatial compression), got "
                            f"{height}x{width}; e.g. {height // m * m or m}x{width // m * m or m}")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> Dict[str, Any]:
        """What a report records about the model and how it was fed."""
        return dict(self.info, kind=self.kind, dtype=str(self.dtype).replace("torch.", ""), device=str(self.device),
                    posterior=self.posterior, frame_rule=str(self.frame_rule),
                    spatial_multiple=self.spatial_compression,
                    temporal_compression=self.temporal_compression, latent_channels=self.latent_channels,
                    time_padding="repeat the last frame, crop back", space_padding="replicate edge, crop back",
                    parameters=self.num_parameters())

    # ----- latents -----------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        raise NotImplementedError

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator: Optional[torch.Generator] = None,
                decode_pixels: bool = True) -> AutoencoderOutput:
        """`decode_pixels=False`: no decode (reconstruction None), for losses that need none."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return AutoencoderOutput(self.decode(z, num_frames=x.shape[2]) if decode_pixels else None, posterior, z)

    @property
    def latent_normalization(self) -> Dict[str, Any]:
        raise NotImplementedError

    def _norm_tensors(self, z: torch.Tensor):
        norm = self.latent_normalization
        return tuple(torch.tensor(norm[k], dtype=torch.float32).reshape(1, -1, *([1] * (z.ndim - 2)))
                     .to(device=z.device, dtype=z.dtype) for k in ("shift", "scale"))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Latents as diffusion training sees them: (z - shift) / scale per channel."""
        shift, scale = self._norm_tensors(z)
        return (z - shift) / scale

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        shift, scale = self._norm_tensors(z)
        return z * scale + shift

    # ----- evaluation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The model's own encode -> decode of `video`, padded to a length and size it takes, cropped back to the
        clip's first frames (module docstring)."""
        if video.ndim != 5:
            raise UserError(f"expected a video (B, C, T, H, W), got shape {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        t_fed = self.frames_needed(t)
        m = self.spatial_compression
        h_fed, w_fed = -(-h // m) * m, -(-w // m) * m
        x = video.to(device=self.device, dtype=self.dtype)
        if t_fed > t:
            x = torch.cat([x, x[:, :, -1:].expand(-1, -1, t_fed - t, -1, -1)], dim=2)
        if (h_fed, w_fed) != (h, w):
            # replicate pads the last dims of a 5-D tensor as (W, H, T) pairs: T untouched
            x = F.pad(x, (0, w_fed - w, 0, h_fed - h, 0, 0), mode="replicate")
        out = self._reconstruct(x, generator)
        if out.shape[2] != t_fed or out.shape[-2:] != x.shape[-2:]:
            raise UserError(
                f"{self.name}: fed {t_fed} frames of {h_fed}x{w_fed} (rule {self.frame_rule}), got "
                f"{out.shape[2]} frames of {out.shape[-2]}x{out.shape[-1]} back; set the length rule in the spec, "
                f"e.g. frames=8k+1"
            )
        return out[:, :, :t, :h, :w]

    def _reconstruct(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        posterior = self.encode(x)
        z = posterior.sample(generator) if self.posterior == "sample" else posterior.mode()
        return self.decode(z, num_frames=x.shape[2])

    def spatial_reconstruction(self, output: AutoencoderOutput) -> torch.Tensor:
        raise UserError(f"{self.name} has no spatial-only path (only the Open-Sora pipeline has one)")

    # ----- training ----------------------------------------------------------------------------------------------
    def encoder_modules(self) -> List[nn.Module]:
        """Everything before the latent (frozen by decoder-only training)."""
        raise NotImplementedError

    def decoder_modules(self) -> List[nn.Module]:
        raise NotImplementedError

    def check_sides(self) -> None:
        """Every trainable parameter belongs to exactly one of the encoder and decoder sides, else a one-line error
        naming those that do not (decoder-only training would silently train or freeze them)."""
        count: Dict[int, int] = {}
        for side in (self.encoder_modules(), self.decoder_modules()):
            for p in {id(p): p for m in side for p in m.parameters()}.values():
                count[id(p)] = count.get(id(p), 0) + 1
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        neither = [n for n, p in trainable if count.get(id(p), 0) == 0]
        both = [n for n, p in trainable if count.get(id(p), 0) > 1]
        if neither or both:
            parts = ([f"{len(neither)} in neither side: {_first(neither)}"] if neither else []) + \
                    ([f"{len(both)} in both sides: {_first(both)}"] if both else [])
            raise UserError(f"{self.name}: cannot split {type(self.model).__name__} into encoder and decoder for "
                            f"decoder-only training; trainable parameter(s) {'; '.join(parts)}")

    def freeze_encoder(self) -> None:
        """Decoder-only training: the encoder side gets no gradient, so every clip keeps its latents bit for bit."""
        self.check_sides()
        for module in self.encoder_modules():
            module.requires_grad_(False)

    def last_decoder_weight(self) -> torch.Tensor:
        """The decoder's last layer's weight (the adaptive GAN weight balances the gradients there)."""
        raise NotImplementedError

    def enable_gradient_checkpointing(self, **kwargs: Any) -> None:
        if not getattr(self.model, "_supports_gradient_checkpointing", True):
            raise UserError(f"{self.name}: {type(self.model).__name__} has no gradient checkpointing")
        self.model.enable_gradient_checkpointing(**kwargs)

    def disable_gradient_checkpointing(self, **kwargs: Any) -> None:
        if getattr(self.model, "_supports_gradient_checkpointing", True):
            self.model.disable_gradient_checkpointing(**kwargs)

    def enable_tiling(self, tile_size: Optional[int] = None, overlap: Optional[int] = None, **options: Any) -> None:
        """The model's own tiling. `tile_size` and `overlap` (the jobs' --tile-size, --tile-overlap) in pixels: a
        diffusers model's tile height and width, and what neighbouring tiles share (its stride, or CogVideoX's
        overlap factor); the Open-Sora pipeline takes its `TilingConfig` keys."""
        model = self.model
        if not hasattr(model, "enable_tiling"):
            raise UserError(f"{self.name}: {type(model).__name__} has no tiling")
        if isinstance(self, OpenSoraAutoencoder):
            model.enable_tiling(**{k: v for k, v in dict(options, tile_size=tile_size, overlap=overlap).items()
                                   if v is not None})
            return
        if any(options.values()):
            raise UserError(f"model.tiling {sorted(k for k, v in options.items() if v)}: the Open-Sora pipeline's "
                            f"tile options; {type(model).__name__} takes tile_size and overlap (--tile-size, "
                            f"--tile-overlap)")
        takes = inspect.signature(model.enable_tiling).parameters
        kwargs: Dict[str, Any] = {}
        if tile_size is not None:
            kwargs.update(tile_sample_min_height=int(tile_size), tile_sample_min_width=int(tile_size))
        if overlap is not None:
            size = int(tile_size if tile_size is not None else model.tile_sample_min_height)
            if "tile_sample_stride_height" in takes:
                stride = size - int(overlap)
                kwargs.update(tile_sample_stride_height=stride, tile_sample_stride_width=stride)
            elif "tile_overlap_factor_height" in takes:
                kwargs.update(tile_overlap_factor_height=overlap / size, tile_overlap_factor_width=overlap / size)
            else:
                raise UserError(f"model.tiling overlap: {type(model).__name__}.enable_tiling takes no overlap")
        model.enable_tiling(**kwargs)

    def disable_tiling(self) -> None:
        if hasattr(self.model, "disable_tiling"):
            self.model.disable_tiling()

    # ----- own format --------------------------------------------------------------------------------------------
    def model_state_dict(self, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """`state_dict` (the model's keys, or this wrapper's with the `model.` prefix) or the model's own, detached
        on the CPU."""
        state = self.model.state_dict() if state_dict is None else state_dict
        if state_dict is not None and set(state) != set(self.model.state_dict()):
            prefix = "model."
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def save_pretrained(self, folder: os.PathLike, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        raise NotImplementedError

    def saved_state_dict(self, folder: os.PathLike) -> Dict[str, torch.Tensor]:
        """The weights a folder written by `save_pretrained` holds, under the model's own keys (a trainer resumes
        them, its EMA too)."""
        raise NotImplementedError

    def spec_for(self, folder: os.PathLike) -> str:
        """The spec (`build.load_autoencoder`) that loads a folder written by `save_pretrained`."""
        raise NotImplementedError


def _first(names: List[str], limit: int = 6) -> str:
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _floats(value: Any, channels: int) -> List[float]:
    """A scalar or per-channel value as `channels` floats."""
    values = value.flatten().tolist() if isinstance(value, torch.Tensor) else value
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise UserError(f"a latent normalisation of {len(values)} values for {channels} latent channels")
    return values


# ----- this project's pipeline ------------------------------------------------------------------------------------
class OpenSoraAutoencoder(VideoAutoencoder):
    """A VideoAutoencoderPipeline: any clip length (its temporal VAE pads), a spatial-only path."""

    kind = "opensora"
    has_spatial_path = True

    def __init__(self, name: str, model: nn.Module, posterior: str = "mode", info: Optional[Dict[str, Any]] = None,
                 frame_rule: Optional[FrameRule] = None):
        geometry = Geometry(frame_rule or FrameRule(), model.temporal_vae.time_downsample_factor,
                            model.spatial_vae.patch_size[1])
        info = dict(info or {}, micro_frame_size=model.micro_frame_size)
        super().__init__(name, model, geometry, posterior, info)

    @property
    def latent_channels(self) -> int:
        return self.model.out_channels

    @property
    def latent_normalization(self) -> Dict[str, Any]:
        c = self.latent_channels
        shift, scale = _floats(self.model.shift, c), _floats(self.model.scale, c)
        return dict(shift=shift, scale=scale, source=dict(shift=shift, scale=scale))

    def encode(self, x):
        # the pipeline's temporal posterior given the spatial VAE's mean: encode_posterior before shift/scale
        return self.model._encode(x, sample_posterior=False)[1]

    def decode(self, z, num_frames):
        return self.model._decode(z, num_frames)[0]

    def forward(self, x, sample_posterior=True, generator=None, decode_pixels=True):
        out = self.model(x, sample_posterior=sample_posterior, generator=generator, decode_pixels=decode_pixels)
        return AutoencoderOutput(out.x_rec, out.posterior, out.z, out)

    def _reconstruct(self, x, generator):
        # the published path: the spatial latents are sampled too when the posterior is
        z = self.model.encode(x, sample_posterior=self.posterior == "sample", generator=generator)
        return self.model.decode(z, num_frames=x.shape[2])

    def spatial_reconstruction(self, output: AutoencoderOutput) -> torch.Tensor:
        """The spatial VAE's own decode of the spatial latents of `output` (a `forward` of this model)."""
        return self.model.spatial_vae.decode(output.native.x_z)

    def encoder_modules(self):
        return list(self.model.encoder_modules())

    def decoder_modules(self):
        spatial, temporal = self.model.spatial_vae.module, self.model.temporal_vae
        return [temporal.post_quant_conv, temporal.decoder, spatial.post_quant_conv, spatial.decoder]

    def last_decoder_weight(self):
        return self.model.temporal_vae.decoder.conv_out.conv.weight  # the reference's get_temporal_last_layer

    def save_pretrained(self, folder, state_dict=None):
        self.model.save_pretrained(folder, state_dict=None if state_dict is None else self.model_state_dict(state_dict))

    def saved_state_dict(self, folder):
        return read_state_dict(resolve_pretrained(str(folder))[1])

    def spec_for(self, folder):
        return f"opensora:{folder}"


# ----- diffusers ---------------------------------------------------------------------------------------------------
def _cfg(model: nn.Module, key: str, default: Any = None) -> Any:
    """An attribute the model set itself (LTX derives its ratios), else its config entry: never the deprecated
    attribute access to config entries that diffusers warns about."""
    value = vars(model).get(key)
    if value is None:
        value = model.config.get(key)
    return default if value is None else value


def _causal(ratio_key: str, spatial_key: str, spatial_default: int = 8) -> Callable[[nn.Module], Geometry]:
    def geometry(model):
        ratio = int(_cfg(model, ratio_key))
        return Geometry(FrameRule(ratio, 1), ratio, int(_cfg(model, spatial_key, spatial_default)))
    return geometry


def _cogvideox(model):
    # 8-frame encoder batches, 2-latent decoder batches: an even latent count decodes to 4n frames (not 4n-3)
    ratio = int(_cfg(model, "temporal_compression_ratio", 4))
    return Geometry(FrameRule(2 * ratio, 1), ratio, 2 ** (len(model.config.block_out_channels) - 1))


def _mochi(model):
    ratio = math.prod(model.config.temporal_expansions)
    return Geometry(FrameRule(ratio, 1), ratio, math.prod(model.config.spatial_expansions))


def _image_vae(model):
    return Geometry(FrameRule(), 1, 2 ** (len(model.config.block_out_channels) - 1), per_frame=True)


# class name -> model -> Geometry
DIFFUSERS_CLASSES: Dict[str, Callable[[nn.Module], Geometry]] = {
    "AutoencoderKLCogVideoX": _cogvideox,
    "AutoencoderKLHunyuanVideo": _causal("temporal_compression_ratio", "spatial_compression_ratio"),
    "AutoencoderKLHunyuanVideo15": _causal("temporal_compression_ratio", "spatial_compression_ratio", 16),
    "AutoencoderKLLTXVideo": _causal("temporal_compression_ratio", "spatial_compression_ratio", 32),
    "AutoencoderKLWan": _causal("scale_factor_temporal", "scale_factor_spatial"),
    "AutoencoderKLMochi": _mochi,
    "AutoencoderKLCosmos": _causal("temporal_compression_ratio", "spatial_compression_ratio"),
    "AutoencoderKL": _image_vae,
}


def diffusers_geometry(model: nn.Module, frame_rule: Optional[FrameRule] = None) -> Geometry:
    """The known class's geometry, else a causal one from `temporal_compression_ratio`; `frame_rule` overrides."""
    name = type(model).__name__
    if name in DIFFUSERS_CLASSES:
        geometry = DIFFUSERS_CLASSES[name](model)
    elif _cfg(model, "temporal_compression_ratio") is not None:
        geometry = _causal("temporal_compression_ratio", "spatial_compression_ratio")(model)
    elif frame_rule is None:
        raise UserError(f"{name}: unknown temporal compression; give frames=RULE in the spec")
    else:
        geometry = Geometry(frame_rule, frame_rule.factor, int(_cfg(model, "spatial_compression_ratio", 8)))
    if frame_rule is not None:
        geometry = Geometry(frame_rule, geometry.temporal, geometry.spatial, geometry.per_frame)
    return geometry


class DiffusersAutoencoder(VideoAutoencoder):
    """A diffusers autoencoder (`ModelMixin` with encode / decode); an image VAE (AutoencoderKL) runs frame by frame.
    `decode_timestep`: the decoder's timestep for classes with timestep_conditioning (LTX-Video)."""

    kind = "diffusers"

    def __init__(self, name: str, model: nn.Module, geometry: Geometry, posterior: str = "mode",
                 info: Optional[Dict[str, Any]] = None, decode_timestep: Optional[float] = None):
        super().__init__(name, model, geometry, posterior, info)
        self.decode_timestep = decode_timestep

    @property
    def latent_channels(self) -> int:
        return int(_cfg(self.model, "latent_channels") or _cfg(self.model, "z_dim"))

    @property
    def latent_normalization(self) -> Dict[str, Any]:
        """(z - shift) / scale with shift = latents_mean (else shift_factor, else 0) and scale = latents_std (else
        1) / scaling_factor (else 1): Wan's, LTX's, Mochi's, CogVideoX's and HunyuanVideo's pipelines alike."""
        c, source = self.latent_channels, {}
        for key in ("latents_mean", "latents_std"):  # LTX holds them as buffers, the others in the config
            value = self.model._buffers.get(key)
            value = self.model.config.get(key) if value is None else value
            if value is not None:
                source[key] = _floats(value, c)
        for key in ("scaling_factor", "shift_factor"):
            if self.model.config.get(key) is not None:
                source[key] = float(self.model.config[key])
        factor = source.get("scaling_factor", 1.0)
        shift = source.get("latents_mean") or [source.get("shift_factor", 0.0)] * c
        scale = [s / factor for s in source.get("latents_std", [1.0] * c)]
        return dict(shift=shift, scale=scale, source=source)

    def _fold(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).flatten(0, 1) if self.geometry.per_frame else x

    def _unfold(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        return x.unflatten(0, (batch, -1)).transpose(1, 2) if self.geometry.per_frame else x

    def encode(self, x):
        enc = self.model.encode(self._fold(x))
        dist = enc.latent_dist if hasattr(enc, "latent_dist") else enc[0]
        # the model's [mean, logvar] parameters: the same clamp and exp, so mean and std are bit-equal
        return DiagonalGaussianDistribution(self._unfold(dist.parameters, x.shape[0]))

    def decode(self, z, num_frames):
        z_in = self._fold(z)
        kwargs = {}
        if self.decode_timestep is not None:
            kwargs["temb"] = torch.full((z_in.shape[0],), self.decode_timestep, device=z.device, dtype=z.dtype)
        out = self.model.decode(z_in, **kwargs)
        out = self._unfold(out.sample if hasattr(out, "sample") else out[0], z.shape[0])
        if out.shape[2] != num_frames:
            raise UserError(f"{self.name}: fed {num_frames} frames (rule {self.frame_rule}), got {out.shape[2]} "
                            f"frames back from {z.shape[2]} latent frames; set the length rule in the spec, e.g. "
                            f"frames=8k+1")
        return out

    def _sides(self, names):
        return [m for m in (getattr(self.model, n, None) for n in names) if isinstance(m, nn.Module)]

    def encoder_modules(self):
        return self._sides(("encoder", "quant_conv"))

    def decoder_modules(self):
        return self._sides(("post_quant_conv", "decoder"))

    def last_decoder_weight(self):
        conv = getattr(getattr(self.model, "decoder", None), "conv_out", None)
        weights = [p for n, p in conv.named_parameters() if n.split(".")[-1] == "weight"] if conv is not None else []
        if not weights:
            raise UserError(f"{self.name}: {type(self.model).__name__} has no decoder.conv_out weight for the "
                            f"adaptive GAN weight")
        return weights[0]

    def save_pretrained(self, folder, state_dict=None):
        """The class's own `save_pretrained`; other weights (an EMA's) through a twin built on the meta device."""
        model = self.model
        if state_dict is not None:
            with torch.device("meta"):
                model = type(self.model).from_config(self.model.config)
            load_strict(model, self.model_state_dict(state_dict), "state_dict", assign=True)
        model.save_pretrained(str(folder))

    def saved_state_dict(self, folder):
        """The class's safetensors weights in `folder` (one file, or the shards its index names)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        index = folder / "diffusion_pytorch_model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
            ["diffusion_pytorch_model.safetensors"]
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: no {missing[0]} (not a folder {type(self.model).__name__}."
                                    f"save_pretrained wrote)")
        state: Dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(folder / f)))
        return state

    def spec_for(self, folder):
        rule = f",frames={self.frame_rule}" if self.info.get("rule_source") == "spec" else ""
        timestep = f",decode_timestep={self.decode_timestep}" if self.decode_timestep else ""
        return f"diffusers:{type(self.model).__name__}={folder}{rule}{timestep}"
