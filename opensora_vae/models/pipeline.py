"""VideoAutoencoderPipeline: the spatial VAE, then the temporal VAE, with latent normalisation."""
from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..registry import MODELS, build_from_cfg, to_plain
from .distributions import DiagonalGaussianDistribution
from .pretrained import CONFIG_NAME, WEIGHTS_NAME, load_strict, read_config, read_state_dict, resolve_pretrained
from .spatial import SDXL_VAE_HUB_ID, check_video, sdxl_vae_config
from ..schema import PositiveInt
from .speed import RUNTIME_OPTIONS, RuntimeOptionsMixin, apply_runtime_options

OPENSORA_V1_2_SHIFT = (-0.10, 0.34, 0.27, 0.98)
OPENSORA_V1_2_SCALE = (3.85, 2.32, 2.33, 3.06)


class PipelineOutput(NamedTuple):
    """What training needs from one pass: unpacks like the reference's loss-mode tuple."""

    x_rec: Optional[torch.Tensor]  # pixels decoded from x_z_rec (None when decode_pixels=False)
    x_z_rec: torch.Tensor  # the temporal VAE's reconstruction of x_z
    z: torch.Tensor  # temporal latent sample, before shift/scale
    posterior: DiagonalGaussianDistribution  # over every micro-chunk
    x_z: torch.Tensor  # spatial VAE latents


def _channel_buffer(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(1, -1, 1, 1, 1)


@MODELS.register_module()
class VideoAutoencoderPipeline(RuntimeOptionsMixin, nn.Module):
    """Constructor arguments are the saved config (config.json); see `from_pretrained` / `save_pretrained`.

    micro_frame_size: the temporal VAE sees chunks of this many frames, each padded on its own (None: whole clip).
    Runtime options (compile, winograd, subpixel, tiling, micro-batching): `speed.RuntimeOptionsMixin`.
    """

    def __init__(
        self,
        vae_2d: Optional[dict] = None,
        vae_temporal: Optional[dict] = None,
        freeze_vae_2d: bool = False,
        micro_frame_size: Optional[PositiveInt] = None,
        shift: Union[float, Sequence[float]] = 0.0,
        scale: Union[float, Sequence[float]] = 1.0,
    ):
        super().__init__()
        if vae_2d is None or vae_temporal is None:
            raise ValueError("VideoAutoencoderPipeline needs both vae_2d and vae_temporal config dicts")
        if micro_frame_size is not None and micro_frame_size < 1:
            raise ValueError(f"micro_frame_size must be a positive integer or None, got {micro_frame_size}")
        self.config = dict(vae_2d=to_plain(vae_2d), vae_temporal=to_plain(vae_temporal),
                           freeze_vae_2d=freeze_vae_2d, micro_frame_size=micro_frame_size,
                           shift=to_plain(shift), scale=to_plain(scale))
        self.spatial_vae = build_from_cfg(vae_2d, MODELS)
        self.temporal_vae = build_from_cfg(vae_temporal, MODELS)
        if self.spatial_vae.out_channels != self.temporal_vae.in_out_channels:
            raise ValueError(
                f"spatial VAE gives {self.spatial_vae.out_channels} latent channels but the temporal VAE takes "
                f"{self.temporal_vae.in_out_channels}"
            )
        self.micro_frame_size = micro_frame_size
        self.freeze_vae_2d = freeze_vae_2d
        self.register_buffer("shift", _channel_buffer(shift))
        self.register_buffer("scale", _channel_buffer(scale))
        self.out_channels = self.temporal_vae.out_channels
        if freeze_vae_2d:
            self.spatial_vae.requires_grad_(False)

    # ----- encode / decode -------------------------------------------------------------------------------
    def _chunks(self, length: int, size: Optional[int]):
        size = size or length
        return [(i, min(i + size, length)) for i in range(0, length, size)]

    def _encode(self, x, sample_posterior=True, generator=None):
        check_video(x, self.spatial_vae.in_channels, self.spatial_vae.patch_size[1])
        x_z = self.spatial_vae.encode(x, sample_posterior=sample_posterior, generator=generator)
        parts = [self.temporal_vae.encode(x_z[:, :, a:b]) for a, b in self._chunks(x_z.shape[2], self.micro_frame_size)]
        posterior = DiagonalGaussianDistribution.cat(parts, dim=2)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return z, posterior, x_z

    def _temporal_decode_chunks(self, z, num_frames, normalised=False):
        """(first frame, spatial latents of that micro-chunk) for each micro-chunk of z, in order; `normalised`
        latents are un-normalised a chunk at a time (that copy is freed before the chunk is yielded)."""
        expected = self.get_latent_size([num_frames, None, None])[0]
        if z.shape[2] != expected:
            raise ValueError(f"{z.shape[2]} latent frames cannot decode to num_frames={num_frames} "
                             f"(that needs {expected})")
        if self.micro_frame_size is None:
            micro_z, micro_x = z.shape[2], num_frames
        else:
            micro_z, micro_x = self.temporal_vae.get_latent_size([self.micro_frame_size])[0], self.micro_frame_size
        for n, (a, b) in enumerate(self._chunks(z.shape[2], micro_z)):
            first = n * micro_x
            part = (z[:, :, a:b] * self.scale).add_(self.shift) if normalised else z[:, :, a:b]
            x_z = self.temporal_vae.decode(part, num_frames=min(micro_x, num_frames - first))
            del part
            yield first, x_z

    def _decode(self, z, num_frames, decode_pixels=True):
        x_z = None
        for first, part in self._temporal_decode_chunks(z, num_frames):
            if part.shape[2] == num_frames:  # one chunk: no copy
                x_z = part
                break
            if x_z is None:
                x_z = part.new_empty(*part.shape[:2], num_frames, *part.shape[3:])
            x_z[:, :, first:first + part.shape[2]] = part
        x = self.spatial_vae.decode(x_z) if decode_pixels else None
        return x, x_z

    def encode(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Video (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, 4, T', H/8, W/8)."""
        z, _, _ = self._encode(x, sample_posterior, generator)
        return (z - self.shift) / self.scale

    def encode_posterior(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the latent posterior, normalised as `encode` normalises (the mean is
        `encode(x, sample_posterior=False)` bit for bit; std / scale); the spatial VAE gives its mean."""
        _, posterior, _ = self._encode(x, sample_posterior=False)
        return (posterior.mean - self.shift) / self.scale, posterior.std / self.scale

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised latents -> video with `num_frames` frames (the encoded clip's length)."""
        check_video(z, self.out_channels, name="latent")
        # Streamed: each micro-chunk's spatial latents are decoded straight into its frames of one preallocated
        # output, so memory beyond the output does not grow with the number of frames (bench/bench_memory.py).
        out = None
        for first, x_z in self._temporal_decode_chunks(z, num_frames, normalised=True):
            if out is None:
                h, w = (n * self.spatial_vae.patch_size[1] for n in x_z.shape[-2:])
                out = x_z.new_empty(x_z.shape[0], self.spatial_vae.in_channels, num_frames, h, w)
            self.spatial_vae.decode(x_z, out=out[:, :, first:first + x_z.shape[2]])
        return out

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = True,
        generator: Optional[torch.Generator] = None,
        decode_pixels: bool = True,
    ) -> PipelineOutput:
        """Training pass (no shift/scale): (x_rec, x_z_rec, z, posterior, x_z)."""
        z, posterior, x_z = self._encode(x, sample_posterior, generator)
        x_rec, x_z_rec = self._decode(z, num_frames=x_z.shape[2], decode_pixels=decode_pixels)
        return PipelineOutput(x_rec, x_z_rec, z, posterior, x_z)

    def forward_spatial(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: Optional[torch.Generator] = None
    ) -> PipelineOutput:
        """The spatial VAE alone as a training pass (x_z_rec None, z = x_z, its own posterior): fits the spatial
        VAE with the pixel losses where no pretrained one exists (the demo's stage 0)."""
        posterior = self.spatial_vae.posterior(x)
        x_z = (posterior.sample(generator) if sample_posterior else posterior.mode()) * self.spatial_vae.scaling_factor
        return PipelineOutput(self.spatial_vae.decode(x_z), None, x_z, posterior, x_z)

    def get_latent_size(self, input_size: Sequence[Optional[int]]) -> list:
        """[T', H', W'] of the latents for an input of [T, H, W] (entries may be None)."""
        size = self.temporal_vae.get_latent_size(self.spatial_vae.get_latent_size(list(input_size)))
        t, m = input_size[0], self.micro_frame_size
        if m is not None and t is not None:
            per_chunk = self.temporal_vae.get_latent_size([m])[0]
            size[0] = (t // m) * per_chunk + (self.temporal_vae.get_latent_size([t % m])[0] if t % m else 0)
        return size

    def encoder_modules(self) -> Tuple[nn.Module, ...]:
        """Everything before the latent: both encoders and their posterior convolutions."""
        spatial = self.spatial_vae.module
        return spatial.encoder, spatial.quant_conv, self.temporal_vae.encoder, self.temporal_vae.quant_conv

    def enable_gradient_checkpointing(self, parts: Union[str, Sequence[str]] = ("spatial", "temporal")) -> None:
        """Recompute activations in backward, per res block, in the temporal VAE and/or the (trained) spatial VAE."""
        for part, vae in self._vaes(parts):
            if part == "temporal" or not self.freeze_vae_2d:
                vae.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self, parts: Union[str, Sequence[str]] = ("spatial", "temporal")) -> None:
        for _, vae in self._vaes(parts):
            vae.disable_gradient_checkpointing()

    @property
    def device(self) -> torch.device:
        return self.shift.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ----- published format --------------------------------------------------------------------------------
    def save_pretrained(self, folder: Union[str, os.PathLike],
                        state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Write config.json + model.safetensors (the published layout); each file is replaced atomically.
        `state_dict`: the weights to write instead of this model's (e.g. their moving average)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = copy.deepcopy(self.config)
        # Record the spatial architecture so loading rebuilds it offline.
        cfg["vae_2d"]["config"] = self.spatial_vae.architecture_config()
        cfg.update(architectures=["VideoAutoencoderPipeline"], model_type="VideoAutoencoderPipeline")
        state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or self.state_dict()).items()}
        tmp = folder / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        os.replace(tmp, folder / CONFIG_NAME)
        tmp = folder / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        # safetensors creates the file owner-only; shared checkpoints need the usual umask-based mode.
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, folder / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: Union[str, os.PathLike],
        cache_dir: Optional[str] = None,
        local_files_only: bool = False,
        torch_dtype: Optional[torch.dtype] = None,
        **options,
    ) -> "VideoAutoencoderPipeline":
        """THE loader: a published-format folder (config.json + model.safetensors), a weights file with its
        config.json beside it, a trainer checkpoint folder or a hub id. `options`: config entries to replace
        (e.g. micro_frame_size, freeze_vae_2d) and runtime options (compile, winograd, subpixel, tiling,
        micro_batch_size; `speed.apply_runtime_options`)."""
        config_path, weights = resolve_pretrained(str(path_or_id), cache_dir, local_files_only)
        if config_path is None:
            raise FileNotFoundError(f"{CONFIG_NAME} missing beside {weights}: cannot tell the model's structure "
                                    f"(give a model config with type and widths to build_model instead)")
        runtime = {k: options.pop(k) for k in list(options) if k in RUNTIME_OPTIONS}
        cfg = read_config(config_path)
        cfg.pop("from_pretrained", None)
        unknown = set(options) - set(cfg)
        if unknown:
            raise TypeError(f"unknown option(s) for {cls.__name__}.from_pretrained: {sorted(unknown)}")
        cfg.update(options)
        state = read_state_dict(weights)
        return _assign(cls, cfg, state, str(weights), torch_dtype, runtime)


def _assign(cls, cfg: dict, state: dict, source: str, torch_dtype, runtime: dict) -> VideoAutoencoderPipeline:
    """Build from `cfg` on the meta device (no random init) and take every tensor from `state`."""
    cfg["vae_2d"] = dict(cfg["vae_2d"])
    if any(k.startswith("spatial_vae.") for k in state):
        # The checkpoint carries the spatial weights: build the architecture locally, no hub download.
        cfg["vae_2d"]["config"] = cfg["vae_2d"].get("config") or sdxl_vae_config()
        cfg["vae_2d"]["from_pretrained"] = None
    cfg["vae_temporal"] = dict(cfg["vae_temporal"], from_pretrained=None)
    with torch.device("meta"):
        model = cls(**cfg)
    load_strict(model, state, source, assign=True)
    if model.freeze_vae_2d:  # assign=True replaced the parameter objects
        model.spatial_vae.requires_grad_(False)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    apply_runtime_options(model, **runtime)
    return model


def load_pipeline(cfg: dict) -> VideoAutoencoderPipeline:
    """A pipeline model dict with `from_pretrained` (build_model's weights path): the checkpoint's config.json
    gives the structure and the dict's own entries replace it (an OpenSoraVAE_V1_2 dict: its micro_frame_size,
    micro_batch_size and freeze_vae_2d, defaults included, as the reference's configs decide them); a bare weights
    file loads into the structure the dict describes."""
    cfg = dict(cfg)
    kind, path = cfg.pop("type"), str(cfg.pop("from_pretrained"))
    hub = {k: cfg.pop(k) for k in ("cache_dir", "local_files_only") if k in cfg}
    config_path, weights = resolve_pretrained(path, **hub)
    if config_path is None:  # a bare weights file: the structure is the dict's
        cfg["vae_2d"] = dict(cfg.get("vae_2d") or {}, from_pretrained=None)
        model = build_from_cfg(dict(cfg, type=kind, **hub), MODELS)
        load_strict(model, read_state_dict(weights), str(weights))
        return model
    if kind == "OpenSoraVAE_V1_2":
        defaults = {k: p.default for k, p in inspect.signature(OpenSoraVAE_V1_2).parameters.items()}
        cfg = {k: cfg.get(k, defaults[k]) for k in ("micro_frame_size", "micro_batch_size", "freeze_vae_2d")}
        if cfg["micro_batch_size"] is None:  # the constructor's None (all frames at once) as a runtime option
            cfg["micro_batch_size"] = False
    else:
        cfg = {k: v for k, v in cfg.items() if k not in ("vae_2d", "vae_temporal")}
    return VideoAutoencoderPipeline.from_pretrained(weights, **hub, **cfg)


@MODELS.register_module()
def OpenSoraVAE_V1_2(
    micro_batch_size: Optional[PositiveInt] = 4,
    micro_frame_size: Optional[PositiveInt] = 17,
    freeze_vae_2d: bool = False,
    cache_dir: Optional[str] = None,
    local_files_only: bool = False,
    vae_2d: Optional[dict] = None,
    vae_temporal: Optional[dict] = None,
) -> VideoAutoencoderPipeline:
    """The published Open-Sora 1.2 VAE's structure (the reference's config type name): the spatial VAE from
    `vae_2d` (default: the SDXL VAE from the hub), the temporal VAE from `vae_temporal` (default VAE_Temporal_SD,
    randomly initialised). Weights come through `build_model(dict(..., from_pretrained=...))` or `from_pretrained`."""
    # Partial dicts are merged onto the published parts, e.g. vae_2d=dict(from_pretrained=LOCAL_DIR).
    vae_2d = dict(
        dict(type="VideoAutoencoderKL", from_pretrained=SDXL_VAE_HUB_ID, subfolder="vae",
             local_files_only=local_files_only, cache_dir=cache_dir, micro_batch_size=micro_batch_size),
        **(vae_2d or {}),
    )
    vae_temporal = dict(dict(type="VAE_Temporal_SD", from_pretrained=None), **(vae_temporal or {}))
    return VideoAutoencoderPipeline(
        vae_2d=vae_2d,
        vae_temporal=vae_temporal,
        freeze_vae_2d=freeze_vae_2d, micro_frame_size=micro_frame_size,
        shift=list(OPENSORA_V1_2_SHIFT), scale=list(OPENSORA_V1_2_SCALE),
    )


# The model types whose `from_pretrained` entry build_model loads through `load_pipeline`.
PIPELINE_TYPES = ("VideoAutoencoderPipeline", "OpenSoraVAE_V1_2")
