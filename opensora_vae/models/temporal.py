"""Temporal VAE: a MAGVIT-v2-style causal 3D conv VAE (no codebook) over the spatial VAE's latents."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..registry import MODELS
from .distributions import DiagonalGaussianDistribution
from .pretrained import load_state_dict_file
from .spatial import check_video
from .speed import RuntimeOptionsMixin

ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


def _triple(k: Union[int, Sequence[int]]) -> Tuple[int, int, int]:
    return (k, k, k) if isinstance(k, int) else tuple(k)


class CausalConv3d(nn.Module):
    """Conv3d that never sees future frames: all time padding goes in front; stride acts on time only."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride: int = 1, bias: bool = True):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        self.time_pad = kt - 1 + (1 - stride)
        # Symmetric H/W zero padding is done inside the convolution (no padded copy of the input); only the
        # one-sided time padding needs an explicit pad.
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), stride=(stride, 1, 1),
                              padding=(0, kh // 2, kw // 2), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad:
            x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0))
        return self.conv(x)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_groups: int, activation: str = "swish"):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, bias=False)
        self.conv3 = CausalConv3d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return h + (x if self.conv3 is None else self.conv3(x))


class _Stack(nn.Module):
    """Shared by Encoder and Decoder: runs res blocks with optional gradient checkpointing."""

    gradient_checkpointing = False

    def _res(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)


def _res_stack(n: int, in_ch: int, out_ch: int, groups: int, act: str) -> nn.ModuleList:
    return nn.ModuleList([ResBlock(in_ch if j == 0 else out_ch, out_ch, groups, act) for j in range(n)])


class Encoder(_Stack):
    def __init__(self, in_out_channels, latent_embed_dim, filters, num_res_blocks, channel_multipliers,
                 temporal_downsample, num_groups, activation="swish"):
        super().__init__()
        self.conv_in = CausalConv3d(in_out_channels, filters, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        prev = filters
        for i, mult in enumerate(channel_multipliers):
            width = filters * mult
            self.block_res_blocks.append(_res_stack(num_res_blocks, prev, width, num_groups, activation))
            prev = width
            if i < len(channel_multipliers) - 1:
                down = temporal_downsample[i]
                self.conv_blocks.append(CausalConv3d(width, width, 3, stride=2) if down else nn.Identity())
        self.res_blocks = _res_stack(num_res_blocks, prev, prev, num_groups, activation)
        self.norm1 = nn.GroupNorm(num_groups, prev)
        self.act = ACTIVATIONS[activation]()
        self.conv2 = CausalConv3d(prev, 2 * latent_embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for i, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = self._res(block, x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = self._res(block, x)
        return self.conv2(self.act(self.norm1(x)))


class Decoder(_Stack):
    def __init__(self, in_out_channels, latent_embed_dim, filters, num_res_blocks, channel_multipliers,
                 temporal_downsample, num_groups, activation="swish"):
        super().__init__()
        width = filters * channel_multipliers[-1]
        self.conv1 = CausalConv3d(latent_embed_dim, width, 3)
        self.res_blocks = _res_stack(num_res_blocks, width, width, num_groups, activation)
        self.temporal_upsample = list(temporal_downsample)
        # Built deepest level first; stored by level index so names match the published checkpoint.
        blocks, convs = {}, {}
        prev = width
        for i in reversed(range(len(channel_multipliers))):
            width = filters * channel_multipliers[i]
            blocks[i] = _res_stack(num_res_blocks, prev, width, num_groups, activation)
            prev = width
            if i > 0:
                up = temporal_downsample[i - 1]
                convs[i - 1] = CausalConv3d(width, 2 * width, 3) if up else nn.Identity()
        self.block_res_blocks = nn.ModuleList([blocks[i] for i in range(len(channel_multipliers))])
        self.conv_blocks = nn.ModuleList([convs[i] for i in range(len(channel_multipliers) - 1)])
        self.norm1 = nn.GroupNorm(num_groups, prev)
        self.act = ACTIVATIONS[activation]()
        self.conv_out = CausalConv3d(prev, in_out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(z)
        for block in self.res_blocks:
            x = self._res(block, x)
        for i in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[i]:
                x = self._res(block, x)
            if i > 0:
                x = self.conv_blocks[i - 1](x)
                if self.temporal_upsample[i - 1]:
                    # Depth to time: channel pairs (pair index fastest) become two consecutive frames.
                    x = rearrange(x, "b (c ts) t h w -> b c (t ts) h w", ts=2)
        return self.conv_out(self.act(self.norm1(x)))


@MODELS.register_module()
class VAE_Temporal(RuntimeOptionsMixin, nn.Module):
    """Causal temporal VAE. Input (B, C, T, H, W); T is front-padded with zeros to a multiple of the time factor.
    Fast paths (oneDNN convolutions on by default) and runtime options: `speed.RuntimeOptionsMixin`."""

    _supported_options = ("tiling",)  # a pipeline's compile and winograd reach its networks too
    vae_part = "temporal"

    def __init__(
        self,
        in_out_channels: int = 4,
        latent_embed_dim: int = 4,
        embed_dim: int = 4,
        filters: int = 128,
        num_res_blocks: int = 4,
        channel_multipliers: Sequence[int] = (1, 2, 2, 4),
        temporal_downsample: Sequence[bool] = (False, True, True),
        num_groups: int = 32,
        activation: str = "swish",
        from_pretrained: Optional[str] = None,
    ):
        super().__init__()
        if len(temporal_downsample) != len(channel_multipliers) - 1:
            raise ValueError(
                f"temporal_downsample needs one entry per level transition ({len(channel_multipliers) - 1}), "
                f"got {list(temporal_downsample)}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        self.in_out_channels = in_out_channels
        self.out_channels = embed_dim
        self.time_downsample_factor = 2 ** sum(bool(d) for d in temporal_downsample)
        self.patch_size = (self.time_downsample_factor, 1, 1)
        widths = dict(in_out_channels=in_out_channels, latent_embed_dim=latent_embed_dim, filters=filters,
                      num_res_blocks=num_res_blocks, channel_multipliers=tuple(channel_multipliers),
                      temporal_downsample=tuple(temporal_downsample), num_groups=num_groups, activation=activation)
        self.encoder = Encoder(**widths)
        self.decoder = Decoder(**widths)
        self.quant_conv = CausalConv3d(2 * latent_embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = CausalConv3d(embed_dim, latent_embed_dim, 1)
        if from_pretrained is not None:
            load_state_dict_file(self, from_pretrained, prefix="temporal_vae.")
        self._apply_default_options()

    def time_padding(self, num_frames: int) -> int:
        return (self.time_downsample_factor - num_frames % self.time_downsample_factor) % self.time_downsample_factor

    def get_latent_size(self, input_size: Sequence[Optional[int]]) -> list:
        t = input_size[0]
        return [None if t is None else math.ceil(t / self.time_downsample_factor), *input_size[1:]]

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        check_video(x, self.in_out_channels, name="temporal VAE input")
        x = F.pad(x, (0, 0, 0, 0, self.time_padding(x.shape[2]), 0))
        return DiagonalGaussianDistribution(self._encode_moments(x))

    def decode(self, z: torch.Tensor, num_frames: Optional[int] = None) -> torch.Tensor:
        """Decode latents; `num_frames` (the encoded clip's length) says how much front padding to drop."""
        check_video(z, self.out_channels, name="temporal latent")
        if num_frames is not None and (num_frames < 1 or self.get_latent_size([num_frames])[0] != z.shape[2]):
            full = z.shape[2] * self.time_downsample_factor
            raise ValueError(f"num_frames={num_frames} does not match {z.shape[2]} latent frames "
                             f"(they decode to {full - self.time_downsample_factor + 1}..{full} frames)")
        return self._decode_latents(z, 0 if num_frames is None else self.time_padding(num_frames))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator: Optional[torch.Generator] = None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, num_frames=x.shape[2]), posterior, z

    # The networks' calls, which the tiled class (`speed.tiled`) replaces.
    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def _decode_latents(self, z: torch.Tensor, pad: int) -> torch.Tensor:
        """The decoded frames without the first `pad` (time padding)."""
        return self.decoder(self.post_quant_conv(z))[:, :, pad:]

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = enabled

    def disable_gradient_checkpointing(self) -> None:
        self.enable_gradient_checkpointing(False)


@MODELS.register_module()
def VAE_Temporal_SD(from_pretrained: Optional[str] = None, **kwargs) -> VAE_Temporal:
    """The published Open-Sora 1.2 temporal VAE widths (309.7M parameters)."""
    widths = dict(in_out_channels=4, latent_embed_dim=4, embed_dim=4, filters=128, num_res_blocks=4,
                  channel_multipliers=(1, 2, 2, 4), temporal_downsample=(False, True, True), num_groups=32)
    widths.update(kwargs)
    return VAE_Temporal(from_pretrained=from_pretrained, **widths)
