"""Tiling's options (`TilingConfig`) and its low-memory path: tiles recomputed per GroupNorm.

The default path is exact (`executor`): segments between GroupNorms over all tiles with exact halos, outputs
stored. When a memory budget cannot hold the stored segments, `plan` falls back to the path here, whose memory is
one tile's: overlapping H/W tiles, blended seams, whole-frame GroupNorm statistics measured norm by norm (pass k
runs every tile up to GroupNorm k and records its input over the tile cores: about L/2 extra passes for L norms;
`exact_norms` caps how many). Its remaining error comes from convolutions whose reach outgrows the tiles' overlap.
The AutoencoderKL's mid-blocks (latent resolution, with the attention) run on the whole frame, or per tile with
exact attention (`tile_mid_block`: the tile's queries over the whole frame's keys/values, `frame_attention`).
Outputs are blended linearly over the inner half of the shared band (a partition of unity) and the outer half,
which saw the padding, is dropped. Options and measurements: docs/speed.md.
"""
from __future__ import annotations

import itertools
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...schema import NonNegativeInt, Range
from .frame_attention import frame_attention


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_bytes(value: Union[int, str]) -> int:
    """8589934592, "8GiB", "8 GB", "512MiB" -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"max_memory must be bytes or a size like '8GiB', got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"max_memory must be bytes, a size like '8GiB' or '512MB', or 'auto', got {value!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"max_memory must be positive, got {value!r}")
    return n


@dataclass(frozen=True)
class TilingConfig:
    """`enable_tiling`'s arguments. tile_size: the largest tile side, in pixels of the layer being run (the exact
    path; the low-memory path: pixels of the spatial VAE's frames, multiples of 16). max_memory: bytes (or "8GiB")
    a tiled VAE call may hold beyond its input and output; the plan (where segment outputs live, the tile size, or
    the low-memory path) follows from it (None: segment outputs on the compute device, tiles of tile_size; "auto":
    90% of the device's free memory when an input shape is first planned).
    The low-memory path's options: overlap (pixels; None: tile_size // 8 rounded down to a multiple of 16),
    temporal_tile_size (the temporal VAE's, in latent pixels, both paths; None: tile_size // 4), temporal_overlap
    (None: about tile_size // 16),
    exact_norms (GroupNorms given whole-frame statistics, one pass each; None: all, 0: each tile's own),
    tile_mid_block (the spatial decoder's mid-block per tile too; same result). recompute: the low-memory path
    whatever the budget (set by exact_norms or tile_mid_block, its options). parallel: split each frame's tiles
    across the ranks of the default process group (exact path; every rank gets the whole output)."""

    tile_size: Annotated[int, Range(16)] = 512
    overlap: Optional[NonNegativeInt] = None
    temporal_tile_size: Optional[int] = None
    temporal_overlap: Optional[int] = None
    exact_norms: Optional[NonNegativeInt] = None
    tile_mid_block: bool = False
    max_memory: Optional[Union[int, str]] = None
    recompute: bool = False
    parallel: bool = False

    def __post_init__(self):
        if self.exact_norms is not None or self.tile_mid_block:
            object.__setattr__(self, "recompute", True)
        if self.recompute and self.parallel:
            raise ValueError("parallel tiling runs the exact path: drop recompute / exact_norms / tile_mid_block")
        if self.max_memory is not None and self.max_memory != "auto":
            object.__setattr__(self, "max_memory", parse_bytes(self.max_memory))
        if self.overlap is None:
            object.__setattr__(self, "overlap", self.tile_size // 8 // 16 * 16)
        if self.exact_norms is not None and self.exact_norms < 0:
            raise ValueError(f"exact_norms must be >= 0, got {self.exact_norms}")
        if self.tile_size % 16 or self.overlap % 16 or self.overlap < 0:
            raise ValueError(f"tile_size and overlap must be non-negative multiples of 16 pixels, got "
                             f"tile_size={self.tile_size}, overlap={self.overlap}")
        if self.tile_size < 2 * self.overlap + 16:
            raise ValueError(f"tile_size={self.tile_size} leaves no core for overlap={self.overlap}: "
                             f"use tile_size >= 2 * overlap + 16")
        t, o = self.temporal
        if o % 2 or t < 2 * o + 2:
            raise ValueError(f"temporal_overlap must be even and temporal_tile_size >= 2 * temporal_overlap + 2, "
                             f"got {t} and {o}")

    @property
    def temporal(self) -> Tuple[int, int]:
        t = self.temporal_tile_size if self.temporal_tile_size is not None else self.tile_size // 4
        o = self.temporal_overlap if self.temporal_overlap is not None else 2 * (self.tile_size // 32)
        return t, o


class Span(NamedTuple):
    core: Tuple[int, int]  # owned by this tile (before blending)
    ext: Tuple[int, int]  # what the output covers: core plus the halo, clipped to the frame
    win: Tuple[int, int]  # what the network sees: ext plus any context its first layers need (`_NormTap.trim`)


def spans(size: int, tile: int, halo: int, align: int = 1, context: int = 0) -> List[Span]:
    """Split [0, size) into cores of at most tile - 2 * halo (boundaries on multiples of `align`), each seen with
    halo + context more on both sides."""
    if size <= tile:
        return [Span((0, size), (0, size), (0, size))]
    n = math.ceil(size / (tile - 2 * halo))
    bounds = sorted({align * round(i * size / n / align) for i in range(n)} | {size})
    m = halo + context
    return [Span((a, b), (max(0, a - halo), min(size, b + halo)), (max(0, a - m), min(size, b + m)))
            for a, b in zip(bounds[:-1], bounds[1:])]


def _ramp(span: Span, first: bool, last: bool, halo: int, num: int, den: int, device) -> Tuple[int, int, torch.Tensor]:
    """Kept output range of a tile and its blending weights (linear over the inner half of the shared band)."""
    (c0, c1), (e0, e1) = span.core, span.ext
    r = halo * num / den  # ramp width in output pixels
    lo = e0 * num // den if first else max(e0 * num // den, math.floor(c0 * num / den - r / 2))
    hi = e1 * num // den if last else min(e1 * num // den, math.ceil(c1 * num / den + r / 2))
    p = torch.arange(lo, hi, device=device, dtype=torch.float32) + 0.5
    w = torch.ones_like(p)
    if not first and r > 0:
        w = torch.minimum(w, ((p - c0 * num / den + r / 2) / r).clamp(0, 1))
    if not last and r > 0:
        w = torch.minimum(w, ((c1 * num / den + r / 2 - p) / r).clamp(0, 1))
    return lo, hi, w


class _Stop(Exception):
    """Ends a statistics pass once the GroupNorm it measures has recorded."""


class _NormTap:
    """Swaps the forward of every GroupNorm in a module, while active, for one that normalises with given
    whole-frame statistics (by call order in one forward) or, past those, with the tile's own, and that can record
    one call's input over the tile's core."""

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
        self.use: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.measure: Optional[int] = None  # the call to record, then stop
        self.record: Optional[list] = None
        self.tile: Optional[Tuple[Span, Span]] = None  # the tile being run (H, W)
        self.extent: Optional[Tuple[Tuple[int, int], ...]] = None  # what its layers cover now: win, then ext
        self.seq = 0

    def start(self, tile: Tuple[Span, Span]) -> None:
        self.seq, self.tile, self.extent = 0, tile, (tile[0].win, tile[1].win)

    def trim(self, x: torch.Tensor) -> torch.Tensor:
        """Crop x, which covers the tile's window, to its ext (dropping the context) for the layers after."""
        if self.tile is None or self.extent == (self.tile[0].ext, self.tile[1].ext):
            return x
        idx = []
        for span, size in zip(self.tile, x.shape[-2:]):
            (e0, e1), (w0, w1) = span.ext, span.win
            scale = size // (w1 - w0)
            idx.append(slice((e0 - w0) * scale, (e1 - w0) * scale))
        self.extent = (self.tile[0].ext, self.tile[1].ext)
        return x[..., idx[0], idx[1]]

    @contextmanager
    def nested(self, seq: int):
        """A recomputation inside the forward that replays GroupNorm calls from `seq` on (same statistics, nothing
        recorded); the outer forward's count resumes afterwards."""
        saved = self.seq, self.measure
        self.seq, self.measure = seq, None
        try:
            yield
        finally:
            self.seq, self.measure = saved

    @contextmanager
    def active(self):
        for m in self.norms:
            m.forward = lambda x, m=m: self._forward(m, x)
        try:
            yield self
        finally:
            for m in self.norms:
                del m.forward

    def _forward(self, m: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        seq, self.seq = self.seq, self.seq + 1
        if seq == self.measure:
            self._accumulate(m.num_groups, x)
            raise _Stop
        if seq not in self.use:
            return F.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)
        mean, var = self.use[seq]
        n, c = x.shape[:2]
        scale = (var + m.eps).rsqrt().repeat_interleave(c // m.num_groups, 1)
        mean = mean.repeat_interleave(c // m.num_groups, 1)
        if m.weight is not None:
            scale = scale * m.weight.float()
        shift = -mean * scale + (m.bias.float() if m.bias is not None else 0)
        view = (n, c) + (1,) * (x.ndim - 2)
        return torch.addcmul(shift.view(view).to(x.dtype), x, scale.view(view).to(x.dtype))

    def _accumulate(self, groups: int, x: torch.Tensor) -> None:
        if self.tile is not None:  # the core of this tile at this layer's resolution
            if x.ndim == 3:  # (N, C, H * W): an attention block's norm over flattened pixels
                x = x.reshape(*x.shape[:2], *self._layer_size(x.shape[-1]))
            idx = []
            for span, (e0, e1), size in zip(self.tile, self.extent, x.shape[-2:]):
                c0, c1 = span.core
                idx.append(slice((c0 - e0) * size // (e1 - e0), (c1 - e0) * size // (e1 - e0)))
            x = x[..., idx[0], idx[1]]
        v = x.float().reshape(x.shape[0], groups, -1)
        cnt = v.shape[-1]
        mean = v.mean(-1)
        m2 = (v - mean[..., None]).square().sum(-1)
        mean, m2 = mean.double(), m2.double()
        if self.record is None:
            self.record = [cnt, mean, m2]
            return
        n0, mean0, m20 = self.record  # Chan et al.'s parallel update: stable for any tile order
        n = n0 + cnt
        delta = mean - mean0
        self.record = [n, mean0 + delta * cnt / n, m20 + m2 + delta.square() * n0 * cnt / n]

    def _layer_size(self, pixels: int) -> Tuple[int, int]:
        """H, W of a flattened layer of this tile: its extent at the layer's scale (s^2 * h * w = pixels)."""
        (h0, h1), (w0, w1) = self.extent
        h = round(math.sqrt(pixels * (h1 - h0) / (w1 - w0)))
        if h < 1 or pixels % h or (pixels // h) * (h1 - h0) != h * (w1 - w0):
            raise ValueError(f"cannot unflatten {pixels} pixels of a {h1 - h0}x{w1 - w0} tile")
        return h, pixels // h

    def measure_call(self, seq: int, tiles) -> bool:
        """Whole-frame statistics of GroupNorm call `seq` (earlier calls already exact); False if fn has fewer."""
        self.measure, self.record = seq, None
        for tile, run in tiles:
            self.start(tile)
            try:
                run()
            except _Stop:
                continue
            break  # the forward ended before call `seq`
        self.measure, self.tile = None, None
        if self.record is None:
            return False
        n, mean, m2 = self.record
        self.use[seq] = (mean.float(), (m2 / n).float())
        return True


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor, tile: int, halo: int,
              exact_norms: Optional[int], align: int = 1, ratio: Tuple[int, int] = (1, 1),
              out: Optional[torch.Tensor] = None, tap: Optional[_NormTap] = None, context: int = 0) -> torch.Tensor:
    """fn maps (N, C, [T,] H, W) to (N, C', [T',] H * ratio, W * ratio); run it tile by tile over H/W.

    module: holds every GroupNorm fn uses. exact_norms: how many of fn's GroupNorm calls (in call order) get exact
    whole-frame statistics, one truncated tiled pass each (None: all); later ones use the tile's own.
    tile, halo, align: in units of x's H/W. out: optional destination of the output's shape (written to).
    tap: the `_NormTap` of module, if fn needs it (None: a new one). context: more input each tile sees beyond
    its halo, for fn's first layers whose reach the halo does not cover; fn drops it with `tap.trim`.
    """
    h_spans, w_spans = (spans(n, tile, halo, align, context) for n in x.shape[-2:])
    if len(h_spans) == len(w_spans) == 1:
        y = fn(x)
        return y if out is None else out.copy_(y)
    tap = _NormTap(module) if tap is None else tap
    with tap.active():
        tiles = [((hs, ws), lambda hs=hs, ws=ws: fn(x[..., hs.win[0]:hs.win[1], ws.win[0]:ws.win[1]]))
                 for hs in h_spans for ws in w_spans]
        # One pass per GroupNorm, each cut short once that norm has recorded.
        for seq in itertools.count() if exact_norms is None else range(exact_norms):
            if not tap.measure_call(seq, tiles):
                break
        num, den = ratio
        for i, hs in enumerate(h_spans):
            h0, h1, wh = _ramp(hs, i == 0, i == len(h_spans) - 1, halo, num, den, x.device)
            for j, ws in enumerate(w_spans):
                w0, w1, ww = _ramp(ws, j == 0, j == len(w_spans) - 1, halo, num, den, x.device)
                tap.start((hs, ws))
                y = fn(x[..., hs.win[0]:hs.win[1], ws.win[0]:ws.win[1]])
                if out is None:
                    out = y.new_zeros(*y.shape[:-2], x.shape[-2] * num // den, x.shape[-1] * num // den)
                elif i == j == 0:
                    out.zero_()
                y = y[..., h0 - hs.ext[0] * num // den:h1 - hs.ext[0] * num // den,
                      w0 - ws.ext[0] * num // den:w1 - ws.ext[0] * num // den]
                weight = (wh[:, None] * ww[None, :]).to(y.dtype)
                out[..., h0:h1, w0:w1].addcmul_(y, weight)
    return out


# ----- the networks' splits ------------------------------------------------------------------------------------
def autoencoderkl_encode(vae, x: torch.Tensor, cfg: TilingConfig) -> torch.Tensor:
    """diffusers AutoencoderKL `_encode` (moments) with the full-resolution down blocks tiled and the rest (the
    mid-block with its attention) on the whole latent frame."""
    enc = vae.encoder

    def down(v):
        v = enc.conv_in(v)
        for block in enc.down_blocks:
            v = block(v)
        return v

    def rest(h):
        h = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(h))))
        return vae.quant_conv(h) if vae.quant_conv is not None else h

    factor = 2 ** (len(enc.down_blocks) - 1)
    return rest(run_tiled(down, enc, x, cfg.tile_size, cfg.overlap // 2, cfg.exact_norms, align=factor,
                          ratio=(1, factor)))


def _reach(*parts: nn.Module) -> int:
    """Pixels beyond its output that a chain of these parts' convolutions reads (an upper bound)."""
    return sum(m.dilation[0] * (m.kernel_size[0] // 2) for p in parts for m in p.modules() if isinstance(m, nn.Conv2d))


def autoencoderkl_decode(vae, z: torch.Tensor, cfg: TilingConfig, out: Optional[torch.Tensor] = None,
                         divisor: float = 1.0) -> torch.Tensor:
    """diffusers AutoencoderKL `_decode` of `z / divisor` with the up blocks tiled and the mid-block on the whole
    latent (or per tile with `cfg.tile_mid_block`, attention still over the whole frame). The division and
    `post_quant_conv` (pointwise) run per window, so the bounded path holds no latent-sized copy of z."""
    dec, mid = vae.decoder, vae.decoder.mid_block

    def latent(v):
        v = v / divisor
        return v if vae.post_quant_conv is None else vae.post_quant_conv(v)

    factor = 2 ** (len(dec.up_blocks) - 1)
    tile, halo = cfg.tile_size // factor, cfg.overlap // 2 // factor

    def up(v):
        for block in dec.up_blocks:
            v = block(v, None)
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(v)))

    if not cfg.tile_mid_block:
        return run_tiled(up, dec, mid(dec.conv_in(latent(z)), None), tile, halo, cfg.exact_norms, ratio=(factor, 1),
                         out=out)
    if len(mid.attentions) > 1:
        raise NotImplementedError("tile_mid_block: a mid-block with more than one attention layer")
    tap = _NormTap(dec)

    def before_attention(v):
        return mid.resnets[0](dec.conv_in(latent(v)), None)

    # Key tiles: conv_in + resnet0 on the core plus their 3x3 convolutions' reach, cropped to the core. Twice the
    # query tile's side: fewer halo pixels to recompute, scores chunked by frame_attention.
    kv_halo = _reach(dec.conv_in, mid.resnets[0])
    kv_tile = max(2 * tile, 4 * kv_halo)

    def key_inputs(seq):
        for hs in spans(z.shape[-2], kv_tile, kv_halo):
            for ws in spans(z.shape[-1], kv_tile, kv_halo):
                with tap.nested(seq):  # held across the yield: frame_attention's group_norm call replays too
                    v = before_attention(z[..., hs.ext[0]:hs.ext[1], ws.ext[0]:ws.ext[1]])
                    yield v[..., hs.core[0] - hs.ext[0]:hs.core[1] - hs.ext[0],
                            ws.core[0] - ws.ext[0]:ws.core[1] - ws.ext[0]]

    # The mid-block's convolutions reach this far beyond each tile: that much context (trimmed after the mid-block)
    # keeps its output as exact as the whole-frame mid-block's, and the halo still covers only the up blocks.
    reach = _reach(dec.conv_in, mid)

    def tiled_mid(v):
        if v.shape[-2:] == z.shape[-2:]:  # the window is the whole frame (e.g. one tile): the plain path
            return tap.trim(mid(dec.conv_in(latent(v)), None))
        seq = tap.seq
        v = before_attention(v)
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            # A pass measuring a norm up to the attention's stops at its query-side call, before any key work.
            v = resnet(v if attn is None else frame_attention(attn, v, key_inputs(seq)), None)
        return tap.trim(v)

    return run_tiled(lambda v: up(tiled_mid(v)), dec, z, tile, halo, cfg.exact_norms, ratio=(factor, 1), out=out,
                     tap=tap, context=reach)


def temporal_tiled(fn, module: nn.Module, x: torch.Tensor, cfg: TilingConfig) -> torch.Tensor:
    """A temporal VAE part (same H/W in and out) tiled over H/W; its GroupNorms span (C_group, T, H, W)."""
    tile, overlap = cfg.temporal
    return run_tiled(fn, module, x, tile, overlap // 2, cfg.exact_norms)
