"""Spatial VAE: a diffusers AutoencoderKL applied frame by frame to (B, C, T, H, W) videos."""
from __future__ import annotations

import json
import logging
import os
from importlib import resources
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import RunError
from ..registry import MODELS
from .distributions import DiagonalGaussianDistribution
from .pretrained import hub_local_only
from .speed import RuntimeOptionsMixin

logger = logging.getLogger(__name__)

SDXL_VAE_HUB_ID = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"


def sdxl_vae_config() -> dict:
    """The SDXL VAE's architecture config, shipped with the package so the full-size model builds offline."""
    text = resources.files("opensora_vae.models").joinpath("sdxl_vae.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def check_video(x: torch.Tensor, channels: int, spatial_factor: int = 1, name: str = "video") -> None:
    """Raise a ValueError naming the problem when `x` is not a (B, C, T, H, W) tensor the model can take."""
    if x.ndim != 5:
        raise ValueError(f"{name} must be 5-D (B, C, T, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels in dim 1 (B, C, T, H, W), got shape {tuple(x.shape)}")
    if x.shape[2] < 1:
        raise ValueError(f"{name} has no frames: shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if spatial_factor > 1 and (h % spatial_factor or w % spatial_factor):
        raise ValueError(
            f"{name} height and width must be multiples of {spatial_factor} (the spatial compression), "
            f"got {h}x{w}; resize or crop, e.g. to "
            f"{h // spatial_factor * spatial_factor}x{w // spatial_factor * spatial_factor}"
        )


def _load_autoencoderkl(from_pretrained: str, subfolder, cache_dir, local_files_only):
    from diffusers import AutoencoderKL

    if not os.path.isdir(os.path.expanduser(from_pretrained)):  # a hub id: fail fast, in one line, without the hub
        config = f"{subfolder}/config.json" if subfolder else "config.json"
        local_files_only = hub_local_only(from_pretrained, config, cache_dir, local_files_only)
    try:
        return AutoencoderKL.from_pretrained(
            from_pretrained, subfolder=subfolder, cache_dir=cache_dir, local_files_only=local_files_only
        )
    except (OSError, ValueError, EnvironmentError) as err:
        where = f"{from_pretrained}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        raise RunError(
            f"could not load the spatial VAE (diffusers AutoencoderKL) from {where}: {err}\n"
            f"Either download it where this machine can read it, e.g. "
            f"`huggingface-cli download {SDXL_VAE_HUB_ID} --include 'vae/*' --local-dir DIR` and set "
            f"from_pretrained=DIR, subfolder='vae'; or load a whole pipeline checkpoint, which carries the spatial "
            f"weights itself."
        ) from err


@MODELS.register_module()
class VideoAutoencoderKL(RuntimeOptionsMixin, nn.Module):
    """AutoencoderKL over frames: frames are folded into the batch, latents are scaled by `scaling_factor`.

    from_pretrained: hub id or local folder of a diffusers AutoencoderKL (with `subfolder`), or None to build a
    randomly initialised model from `config` (an AutoencoderKL config dict; None means the SDXL VAE architecture).
    micro_batch_size: frames per AutoencoderKL call (`enable_micro_batching`; None: all at once).
    Fast paths (sub-pixel upsampling on by default) and runtime options: `speed.RuntimeOptionsMixin`.
    """

    vae_part = "spatial"

    def __init__(
        self,
        from_pretrained: Optional[str] = None,
        micro_batch_size: Optional[int] = None,
        cache_dir: Optional[str] = None,
        local_files_only: bool = False,
        subfolder: Optional[str] = None,
        scaling_factor: float = 0.18215,
        config: Optional[dict] = None,
    ):
        super().__init__()
        from diffusers import AutoencoderKL

        if from_pretrained is not None:
            self.module = _load_autoencoderkl(from_pretrained, subfolder, cache_dir, local_files_only)
        else:
            self.module = AutoencoderKL(**(dict(config) if config is not None else sdxl_vae_config()))
        self.micro_batch_size: Optional[int] = None
        self.scaling_factor = scaling_factor
        cfg = self.module.config
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.latent_channels
        # Each down block but the last halves H and W.
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.patch_size = (1, factor, factor)
        self._apply_default_options(micro_batch_size=micro_batch_size)

    def architecture_config(self) -> dict:
        """The AutoencoderKL constructor config (for saving a pipeline that rebuilds offline)."""
        return {k: v for k, v in dict(self.module.config).items() if not k.startswith("_")}

    def _frames(self, x: torch.Tensor, fn, channels: int, ratio: Tuple[int, int],
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fn(frames (n, C, H, W), dest or None) over micro-batches of frames, written into one preallocated
        (B, channels, T, H * ratio, W * ratio) output (or `out`, a view of that shape): no per-chunk outputs and no
        concatenated copy."""
        b, _, t, h, w = x.shape
        num, den = ratio
        shape = (b, channels, t, h * num // den, w * num // den)
        if out is None:
            out = x.new_empty(shape)
        elif tuple(out.shape) != shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")
        step = self.micro_batch_size or b * t
        for i in range(0, b * t, step):
            j = min(i + step, b * t)
            if i // t == (j - 1) // t:  # within one video: write straight into the output
                v, t0 = divmod(i, t)
                # A view, not a copy: the convolutions (or the tiles' windows) make what they read contiguous.
                fn(x[v, :, t0:t0 + j - i].transpose(0, 1), out[v, :, t0:t0 + j - i].transpose(0, 1))
            else:
                y = fn(torch.stack([x[k // t, :, k % t] for k in range(i, j)]), None)
                for n, k in enumerate(range(i, j)):
                    out[k // t, :, k % t] = y[n]
        return out

    def _encode_frames(self, f: torch.Tensor, dest: Optional[torch.Tensor]) -> torch.Tensor:
        y = self.module.encode(f).latent_dist.parameters
        return y if dest is None else dest.copy_(y)

    def _decode_frames(self, f: torch.Tensor, dest: Optional[torch.Tensor]) -> torch.Tensor:
        y = self.module.decode(f / self.scaling_factor).sample
        return y if dest is None else dest.copy_(y)

    def encode(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Scaled latents (B, 4, T, H/8, W/8) of a video in [-1, 1]; the posterior mean when not sampling."""
        # Sample once over all frames so the result does not depend on micro_batch_size.
        dist = self.posterior(x)
        z = dist.sample(generator) if sample_posterior else dist.mode()
        return z * self.scaling_factor

    def posterior(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """The per-frame latent distribution (B, 4, T, H/8, W/8), before `scaling_factor`."""
        check_video(x, self.in_channels, self.patch_size[1])
        return DiagonalGaussianDistribution(
            self._frames(x, self._encode_frames, 2 * self.out_channels, (1, self.patch_size[1])))

    def decode(self, z: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Video (B, 3, T, H * f, W * f) of scaled latents, written into `out` if given (e.g. frames of a longer
        video)."""
        check_video(z, self.out_channels, name="latent")
        return self._frames(z, self._decode_frames, self.in_channels, (self.patch_size[1], 1), out=out)

    def get_latent_size(self, input_size: Sequence[Optional[int]]) -> list:
        return [None if n is None else n // p for n, p in zip(input_size, self.patch_size)]

    def enable_gradient_checkpointing(self) -> None:
        self.module.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        self.module.disable_gradient_checkpointing()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
