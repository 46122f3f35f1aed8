"""GAN discriminators of the Open-Sora 1.2 VAE recipe, registered under the reference's type names.

* `NLayerDiscriminator` - 2D PatchGAN (pix2pix) on single frames: (N, C, H, W) -> (N, 1, H', W') patch logits.
  The reference trainer folds a clip into frames, `(b t) c h w`, before calling it.
* `N_Layer_DISCRIMINATOR_3D` - the same PatchGAN with 3D convolutions: (B, C, T, H, W) -> (B, 1, T', H', W').
* `DISCRIMINATOR_3D` - a StyleGAN-style discriminator with anti-aliased (blurred) 3D downsampling and a linear
  head over a fixed clip size: (B, C, T, H, W) -> (B, 1).

Parameter and buffer names in `state_dict()` are those of the reference modules, so a reference discriminator
checkpoint loads as is. `from_pretrained` takes a weights file (.safetensors / .pt / .pth / .bin) or a folder
holding one (or a sharded `*.index.json`), directly or in the subfolder the reference trainer writes
(`model/` for the 2D discriminator, `discriminator/` for the 3D ones); loading is strict.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..registry import MODELS
from ..runtime import DTYPES
from .pretrained import load_strict, read_state_dict

logger = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")


# ----- weights --------------------------------------------------------------------------------------------------
def _find_weights(path: Path, subfolder: str) -> Sequence[Path]:
    """The weight file(s) of `path`: itself if a file, else a single file or the shards named by an index."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"discriminator checkpoint {path} not found")
    for folder in (path, path / subfolder):
        indexes = sorted(folder.glob("*.index.json")) if folder.is_dir() else []
        if indexes:
            with open(indexes[0]) as f:
                weight_map = json.load(f)["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        for name in _WEIGHT_FILES:
            if (folder / name).is_file():
                return [folder / name]
    raise FileNotFoundError(
        f"no discriminator weights in {path} or {path / subfolder}: expected one of {', '.join(_WEIGHT_FILES)} "
        f"or a sharded *.index.json"
    )


def _inflate(state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """2D weights -> 3D: a kernel (O, I, kh, kw) whose 3D counterpart is (O, I, kt, kh, kw) goes into the central
    time slice (index kt // 2), zeros elsewhere; everything else is kept."""
    out = {}
    for key, value in state.items():
        target = own.get(key)
        if target is not None and value.ndim == 4 and target.ndim == 5 and target[:, :, 0].shape == value.shape:
            inflated = torch.zeros(target.shape, dtype=value.dtype)
            inflated[:, :, target.shape[2] // 2] = value
            value = inflated
        out[key] = value
    return out


def load_discriminator_weights(module: nn.Module, path: Union[str, os.PathLike], subfolder: str = "discriminator",
                               inflate_from_2d: bool = False) -> None:
    """Load a checkpoint (file, folder, or the trainer's `subfolder` in it) into `module`, strictly; with
    `inflate_from_2d`, 2D conv kernels are placed in the centre of the 3D kernels' time axis."""
    files = _find_weights(Path(os.path.expanduser(str(path))), subfolder)
    state: Dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_state_dict(file))
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped module
        state = {k[len("module."):]: v for k, v in state.items()}
    if inflate_from_2d:
        state = _inflate(state, module.state_dict())
    load_strict(module, state, str(path))
    logger.info("loaded discriminator weights from %s", path)


def _maybe_load(module: nn.Module, from_pretrained: Optional[str], use_pretrained: bool, inflate_from_2d: bool,
                subfolder: str) -> None:
    if from_pretrained is None:
        return
    if not use_pretrained:
        logger.info("discriminator use_pretrained=False: %s not loaded, weights stay initialised", from_pretrained)
        return
    load_discriminator_weights(module, from_pretrained, subfolder=subfolder, inflate_from_2d=inflate_from_2d)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ----- PatchGAN ---------------------------------------------------------------------------------------------------
def _patchgan_layers(conv, norm, input_nc: int, ndf: int, n_layers: int, mid_stride) -> nn.Sequential:
    """The pix2pix layer stack: conv(s2)+lrelu, (n_layers - 1) x [conv(mid_stride)+norm+lrelu], conv(s1)+norm+lrelu,
    conv(s1) to one channel; kernels 4, padding 1; channel multiplier 2^i capped at 8; no bias before a norm.
    Its indices are the reference's `main.<i>` names."""
    width = [ndf * min(2 ** i, 8) for i in range(n_layers + 1)]
    layers = [conv(input_nc, width[0], kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
    for i in range(1, n_layers + 1):
        stride = mid_stride if i < n_layers else 1
        layers += [conv(width[i - 1], width[i], kernel_size=4, stride=stride, padding=1, bias=False),
                   norm(width[i]), nn.LeakyReLU(0.2, True)]
    layers.append(conv(width[n_layers], 1, kernel_size=4, stride=1, padding=1))
    return nn.Sequential(*layers)


def _patchgan_init(module: nn.Module) -> None:
    """The reference's init for the 3D PatchGAN: conv weights ~ N(0, 0.02) (biases keep PyTorch's default),
    batch-norm scale ~ N(1, 0.02) and shift 0."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


@MODELS.register_module()
class NLayerDiscriminator(nn.Module):
    """2D PatchGAN discriminator (pix2pix) applied to single frames.

    Takes (N, input_nc, H, W) frames - the trainer folds clips as `(b t) c h w` - and returns (N, 1, H', W')
    patch logits with H' = H // 2**n_layers - 2 for H divisible by 2**n_layers (30 x 30 for 256 x 256 input and
    n_layers=3), likewise W'. BatchNorm2d layers: batch statistics in training mode.

    As in the reference, the weights keep PyTorch's default initialisation (no N(0, 0.02) re-init) and
    `use_actnorm` is ignored (BatchNorm is used; a warning says so). `from_pretrained`: weights loaded strictly
    (a file, or a folder holding the weights directly or in `model/`).
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False,
                 from_pretrained: Optional[str] = None):
        super().__init__()
        _check_positive(input_nc=input_nc, ndf=ndf, n_layers=n_layers)
        if use_actnorm:
            logger.warning("NLayerDiscriminator: use_actnorm=True is ignored, as in the reference (BatchNorm2d used)")
        self.main = _patchgan_layers(nn.Conv2d, nn.BatchNorm2d, input_nc, ndf, n_layers, mid_stride=2)
        _maybe_load(self, from_pretrained, True, False, subfolder="model")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"NLayerDiscriminator takes (N, C, H, W) frames (fold clips as '(b t) c h w'), "
                             f"got shape {tuple(x.shape)}")
        return self.main(x)


@MODELS.register_module("N_Layer_DISCRIMINATOR_3D")
class NLayerDiscriminator3D(nn.Module):
    """3D PatchGAN discriminator on clips (reference type name `N_Layer_DISCRIMINATOR_3D`).

    Takes (B, input_nc, T, H, W) and returns (B, 1, T', H', W') patch logits: the first convolution strides 2 in
    time and space, the next ones 2 in space only, so T' = T // 2 - n_layers - 1 and H' = H // 2**n_layers - 2
    (H divisible by 2**n_layers); T must be at least 2 * (n_layers + 2) (10 for n_layers=3), so single frames
    do not fit.

    Init as the reference: conv weights ~ N(0, 0.02), BatchNorm3d scale ~ N(1, 0.02), shift 0.
    Difference: the reference's registered builder ignores input_nc / ndf / n_layers (always 3 / 64 / 3, the
    defaults here); here they are honoured. `use_actnorm=True` is not implemented (as in the reference).
    `from_pretrained` (a file, or a folder holding the weights directly or in `discriminator/`) is loaded strictly
    unless `use_pretrained` is False; `inflate_from_2d` loads a 2D PatchGAN's weights, each 4x4 kernel into the
    central time slice of the 4x4x4 one (the reference's intent; its own inflation code does not run).
    """

    def __init__(self, from_pretrained: Optional[str] = None, inflate_from_2d: bool = False,
                 use_pretrained: bool = True, input_nc: int = 3, ndf: int = 64, n_layers: int = 3,
                 use_actnorm: bool = False):
        super().__init__()
        _check_positive(input_nc=input_nc, ndf=ndf, n_layers=n_layers)
        if use_actnorm:
            raise ValueError("N_Layer_DISCRIMINATOR_3D: use_actnorm=True is not implemented (nor in the reference)")
        self.n_layers = n_layers
        self.main = _patchgan_layers(nn.Conv3d, nn.BatchNorm3d, input_nc, ndf, n_layers, mid_stride=(1, 2, 2))
        self.apply(_patchgan_init)
        _maybe_load(self, from_pretrained, use_pretrained, inflate_from_2d, subfolder="discriminator")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"N_Layer_DISCRIMINATOR_3D takes (B, C, T, H, W) clips, got shape {tuple(x.shape)}")
        if x.shape[2] // 2 - self.n_layers - 1 < 1:
            raise ValueError(f"N_Layer_DISCRIMINATOR_3D with n_layers={self.n_layers} needs at least "
                             f"{2 * (self.n_layers + 2)} frames, got {x.shape[2]}")
        return self.main(x)


N_Layer_DISCRIMINATOR_3D = NLayerDiscriminator3D


# ----- StyleGAN-style discriminator ------------------------------------------------------------------------------
def _binomial_filter_3d(size: int) -> torch.Tensor:
    row = torch.tensor([math.comb(size - 1, k) for k in range(size)], dtype=torch.float64)
    cube = row[:, None, None] * row[None, :, None] * row[None, None, :]
    return cube / cube.sum()


class BlurPool3D(nn.Module):
    """Anti-aliased downsampling: reflect-pad, then a normalised binomial (1, 2, 1)^3 blur per channel, stride 2
    in time, height and width (each size n -> ceil(n / 2); every size must be >= 2). The filter is the
    persistent buffer `filt` (C, 1, 3, 3, 3), as in the reference's state dict."""

    def __init__(self, channels: int, filt_size: int = 3, stride: int = 2, device=None, dtype=None):
        super().__init__()
        self.stride = stride
        self.pad = ((filt_size - 1) // 2, filt_size // 2) * 3
        filt = _binomial_filter_3d(filt_size).to(device=device, dtype=dtype or torch.get_default_dtype())
        self.register_buffer("filt", filt.expand(channels, 1, -1, -1, -1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.pad, mode="reflect")
        return F.conv3d(x, self.filt, stride=self.stride, groups=x.shape[1])


class ResBlockDown(nn.Module):
    """StyleGAN residual block that halves T, H and W: main path conv3x3x3 -> GroupNorm -> act -> blur ->
    conv3x3x3 -> GroupNorm -> act, skip path blur -> conv1x1x1 (no bias); output (main + skip) / sqrt(2)."""

    def __init__(self, in_channels: int, filters: int, activation: nn.Module, num_groups: int = 32,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.activation_fn = activation
        self.conv1 = nn.Conv3d(in_channels, in_channels, 3, padding=1, **kw)
        self.norm1 = nn.GroupNorm(num_groups, in_channels, **kw)
        self.blur = BlurPool3D(in_channels, **kw)
        self.conv2 = nn.Conv3d(in_channels, filters, 1, bias=False, **kw)
        self.conv3 = nn.Conv3d(in_channels, filters, 3, padding=1, **kw)
        self.norm2 = nn.GroupNorm(num_groups, filters, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.conv2(self.blur(x))
        h = self.activation_fn(self.norm1(self.conv1(x)))
        h = self.activation_fn(self.norm2(self.conv3(self.blur(h))))
        return (skip + h) / math.sqrt(2)


def _xavier_init(module: nn.Module) -> None:
    """The reference's init for the StyleGAN discriminator: Conv3d / Linear weights xavier-uniform with the ReLU
    gain (sqrt 2), biases 0; GroupNorm keeps (1, 0)."""
    if isinstance(module, (nn.Conv3d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight, gain=nn.init.calculate_gain("relu"))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _as_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(sorted(DTYPES))} or a torch.dtype, got {dtype!r}")
    return DTYPES[dtype]


@MODELS.register_module("DISCRIMINATOR_3D")
class StyleGANDiscriminatorBlur(nn.Module):
    """StyleGAN-style 3D discriminator with blurred downsampling (reference type name `DISCRIMINATOR_3D`).

    Takes (B, in_channels, num_frames, H, W) with (H, W) = image_size and returns (B, 1) logits, one per clip:
    conv3x3x3 -> act, one `ResBlockDown` per entry of channel_multipliers (widths filters * m), conv3x3x3 ->
    GroupNorm(num_groups) -> act, flatten (c t h w), linear -> act -> linear. The clip size is fixed by the linear
    head: H and W must be divisible by 2**len(channel_multipliers), and num_frames > 2**(len - 1) so that the
    reflect padding of every downsampling has >= 2 frames (single frames do not fit).

    As in the reference: the residual blocks' GroupNorms always use 32 groups (num_groups acts on the last norm
    only), activations are LeakyReLU(0.2), Conv3d / Linear weights are xavier-uniform (ReLU gain) with zero
    biases, and parameters are created in `dtype` (default bf16) on `device`. The reference's blur padding
    helper is undefined (building it raises NameError); reflect padding, its stated `pad_type`, is used here.
    `from_pretrained` (a file, or a folder holding the weights directly or in `discriminator/`) is loaded strictly
    unless `use_pretrained` is False; `inflate_from_2d` places 2D kernels at the centre of the time axis.
    """

    def __init__(
        self,
        from_pretrained: Optional[str] = None,
        inflate_from_2d: bool = False,
        use_pretrained: bool = True,
        image_size: Union[int, Tuple[int, int]] = (128, 128),
        num_frames: int = 17,
        in_channels: int = 3,
        filters: int = 128,
        channel_multipliers: Tuple[int, ...] = (2, 4, 4, 4, 4),
        num_groups: int = 32,
        dtype: Union[str, torch.dtype] = "bf16",
        device: Union[str, torch.device] = "cpu",
    ):
        super().__init__()
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2:
            raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
        _check_positive(num_frames=num_frames, in_channels=in_channels, filters=filters, num_groups=num_groups,
                        image_height=size[0], image_width=size[1])
        multipliers = tuple(channel_multipliers)
        if not multipliers:
            raise ValueError("channel_multipliers must name at least one block")
        _check_positive(**{f"channel_multipliers[{i}]": m for i, m in enumerate(multipliers)})
        scale = 2 ** len(multipliers)
        if size[0] % scale or size[1] % scale:
            raise ValueError(f"image_size {size} must be divisible by 2**len(channel_multipliers) = {scale}")
        if num_frames <= scale // 2:
            raise ValueError(f"num_frames={num_frames} is too short for {len(multipliers)} downsampling blocks: "
                             f"need more than {scale // 2}")
        kw = dict(device=torch.device(device), dtype=_as_dtype(dtype))
        self.input_size = size
        self.num_frames = num_frames
        self.in_channels = in_channels
        self.activation_fn = nn.LeakyReLU(negative_slope=0.2)

        self.conv1 = nn.Conv3d(in_channels, filters, 3, padding=1, **kw)
        widths = [filters] + [filters * m for m in multipliers]
        # Each block is initialised as it is built and again with the whole model, as the reference does (the
        # same random stream: a seed gives the reference's weights).
        self.res_block_list = nn.ModuleList(
            ResBlockDown(widths[i], widths[i + 1], self.activation_fn, **kw).apply(_xavier_init)
            for i in range(len(multipliers)))
        self.conv2 = nn.Conv3d(widths[-1], widths[-1], 3, padding=1, **kw)
        self.norm1 = nn.GroupNorm(num_groups, widths[-1], **kw)
        t_out = -(-num_frames // scale)  # ceil: each block takes n frames to ceil(n / 2)
        in_features = widths[-1] * t_out * (size[0] // scale) * (size[1] // scale)
        self.linear1 = nn.Linear(in_features, widths[-1], **kw)
        self.linear2 = nn.Linear(widths[-1], 1, **kw)
        self.apply(_xavier_init)
        _maybe_load(self, from_pretrained, use_pretrained, inflate_from_2d, subfolder="discriminator")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.num_frames, *self.input_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"DISCRIMINATOR_3D takes (B, C, T, H, W) = (B, {', '.join(map(str, expected))}) "
                             f"(its linear head fixes the clip size), got shape {tuple(x.shape)}")
        x = self.activation_fn(self.conv1(x))
        for block in self.res_block_list:
            x = block(x)
        x = self.activation_fn(self.norm1(self.conv2(x)))
        x = self.activation_fn(self.linear1(rearrange(x, "b c t h w -> b (c t h w)")))
        return self.linear2(x)


DISCRIMINATOR_3D = StyleGANDiscriminatorBlur
