"""Exact tiled execution: a network runs segment by segment (the layers between two GroupNorms), each segment over
all tiles with exactly the halo its convolutions read, and its output is stored whole (on the device or in host
memory). A GroupNorm normalises with its input's whole-frame statistics, reduced over the stored frame (and across
ranks) before the next segment reads it; attention reads the whole frame's keys and values. So the result is the
untiled one up to float rounding, at the cost of the halos and of storing segment outputs.

The networks' programs at the end restate the blocks' forwards (diffusers AutoencoderKL, the temporal VAE) as
segments; a block configuration they do not describe is refused (`Unsupported`), and the tests compare each program
with the modules' own forward. With ranks (`group`), each rank computes its own rows of every segment and keeps only
those rows plus the halo the next segment reads, exchanged with its neighbours.
"""
from __future__ import annotations

import math
import os
import weakref
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ...errors import UserError


MARGIN = 2  # rows of the neighbours' bands each rank keeps: the most any segment here reads beyond a band


class Unsupported(NotImplementedError):
    """A block configuration the programs do not describe (the caller falls back to another path)."""


class Stored:
    """A whole-frame activation (..., H, W), or with ranks this rank's band of rows plus margins, and the pointwise
    transform its readers apply (a pending GroupNorm and activation)."""

    def __init__(self, data: torch.Tensor, pre: Optional[Callable] = None, band: Optional[Tuple[int, int]] = None,
                 rows: Optional[Tuple[int, int]] = None, height: Optional[int] = None, filled: bool = True):
        self.data, self.pre = data, pre
        self.height = height or data.shape[-2]  # the whole frame's rows
        self.band = band or (0, self.height)  # the rows this rank computes
        self.rows = rows or (0, data.shape[-2])  # the rows `data` holds: the band and its margins
        self._filled = [filled]  # whether the margins hold the neighbours' rows yet (shared with `with_pre` views)

    @property
    def filled(self) -> bool:
        return self._filled[0]

    @filled.setter
    def filled(self, value: bool) -> None:
        self._filled[0] = value

    @property
    def size(self) -> Tuple[int, int]:
        return self.height, self.data.shape[-1]

    def own(self) -> torch.Tensor:
        """The band's rows of data."""
        return self.data[..., self.band[0] - self.rows[0]:self.band[1] - self.rows[0], :]

    def read(self, h: Tuple[int, int], w: Tuple[int, int], device: torch.device) -> torch.Tensor:
        x = self.data[..., h[0] - self.rows[0]:h[1] - self.rows[0], w[0]:w[1]]
        x = x.to(device, non_blocking=True)
        return x if self.pre is None else self.pre(x)

    def with_pre(self, pre: Callable) -> "Stored":
        view = Stored(self.data, pre, self.band, self.rows, self.height)
        view._filled = self._filled
        return view


def _cores(size: int, tile: int, align: int) -> List[Tuple[int, int]]:
    """[0, size) cut into about equal parts of at most `tile` (boundaries on multiples of `align`)."""
    n = max(1, math.ceil(size / max(tile, align)))
    bounds = sorted({align * round(i * size / n / align) for i in range(n)} | {size})
    return list(zip(bounds[:-1], bounds[1:]))


def _merge(a, b):
    """Chan et al.'s parallel update of (count, mean, M2): exact for any split, stable in float64."""
    if a is None:
        return b
    n0, m0, s0 = a
    n1, m1, s1 = b
    n = n0 + n1
    d = m1 - m0
    return n, m0 + d * (n1 / n), s0 + s1 + d.square() * (n0 * n1 / n)


def _normalise(gn: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor, act: Optional[nn.Module],
               x: torch.Tensor) -> torch.Tensor:
    """gn(x) with the given per-(sample, group) statistics, then `act`; computed in float32 at least."""
    n, c = x.shape[:2]
    rstd = (var + gn.eps).rsqrt()
    scale = rstd.repeat_interleave(c // gn.num_groups, 1)
    shift = -mean.repeat_interleave(c // gn.num_groups, 1) * scale
    if gn.weight is not None:
        scale = scale * gn.weight.float()
        shift = shift * gn.weight.float() + gn.bias.float()
    view = (n, c) + (1,) * (x.ndim - 2)
    y = torch.addcmul(shift.view(view), x.float(), scale.view(view)).to(x.dtype)
    return y if act is None else act(y)


class Executor:
    """Runs a program of `local` segments, `norm`s and `attention` over tiles of side at most `tile` (each layer's
    own pixels). store: 'device' (segment outputs on the compute device) or 'host' (CPU memory, pinned for CUDA).
    plan_only: run under FakeTensorMode to measure `peak` (bytes of stored frames) and `work` (the largest tile's
    working set, estimated) without computing. group: a process group whose ranks split each frame's rows."""

    def __init__(self, device: torch.device, tile: int, store: str = "device", plan_only: bool = False,
                 group=None):
        self.device, self.tile, self.plan_only = device, tile, plan_only
        self.store = device if store == "device" else torch.device("cpu")
        self.pin = store == "host" and device.type == "cuda"
        self.live = self.peak = self.work = 0
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world = dist.get_world_size(group) if group is not None else 1

    # ----- storage ---------------------------------------------------------------------------------------------
    def _free(self, n: int) -> None:
        self.live -= n

    def _alloc(self, shape, dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.store, pin_memory=self.pin and not self.plan_only)
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, n)
        return t

    def frame(self, x: torch.Tensor, align: int = 1) -> Stored:
        """The program's input, whole on every rank (not counted: the caller holds it). align: band boundaries on
        multiples of this (the program's total downsampling), so that every layer's bands are whole rows."""
        band = self._band(x.shape[-2], align)
        return Stored(x, band=band)

    def _band(self, size: int, align: int) -> Tuple[int, int]:
        """This rank's rows of a frame `size` rows high (about equal bands on multiples of `align`)."""
        if self.world == 1:
            return 0, size
        units = size // align
        if units < self.world:
            raise UserError(f"parallel tiling: a frame of {size} rows cannot be split across {self.world} ranks "
                            f"(at least {self.world * align} rows)")
        k = self.rank
        return align * (k * units // self.world), align * ((k + 1) * units // self.world)

    # ----- segments ----------------------------------------------------------------------------------------------
    def local(self, fn: Callable[..., torch.Tensor], inputs: Sequence[Stored], reach: int,
              scale: Tuple[int, int] = (1, 1), out: Optional[torch.Tensor] = None) -> Stored:
        """fn over tiles of `inputs` (same H/W), each tile's window extended by `reach` input pixels (what fn's
        convolutions read beyond an output pixel); the output is (H, W) * num / den. out: where to write the whole
        output (not counted: the caller's; with ranks, every rank's gets the whole frame)."""
        num, den = scale
        h, w = inputs[0].size
        reach = -(-reach // den) * den  # whole output pixels, aligned windows
        b0, b1 = inputs[0].band
        o0, o1 = b0 * num // den, b1 * num // den
        ho, wo = h * num // den, w * num // den
        if self.world > 1:
            for x in inputs:
                self._exchange(x, reach)
        if self.plan_only:
            return self._plan_local(fn, inputs, reach, scale, out, (b0, b1))
        dest = out
        if dest is None:  # this rank's band and a margin the next segment's convolutions read from neighbours
            m0, m1 = (max(0, o0 - MARGIN), min(ho, o1 + MARGIN)) if self.world > 1 else (0, ho)
        else:
            m0, m1 = 0, ho
        for a, b in _cores(b1 - b0, self.tile, den):
            a, b = a + b0, b + b0
            for c, d in _cores(w, self.tile, den):
                h0, h1 = max(0, a - reach), min(h, b + reach)
                w0, w1 = max(0, c - reach), min(w, d + reach)
                y = fn(*(x.read((h0, h1), (w0, w1), self.device) for x in inputs))
                if y.shape[-2:] != ((h1 - h0) * num // den, (w1 - w0) * num // den):
                    raise RuntimeError(f"a segment mapped a {h1 - h0}x{w1 - w0} window to {tuple(y.shape[-2:])}, "
                                       f"expected x{num}/{den}")
                if dest is None:
                    dest = self._alloc((*y.shape[:-2], m1 - m0, wo), y.dtype)
                dest[..., a * num // den - m0:b * num // den - m0, c * num // den:d * num // den].copy_(
                    y[..., (a - h0) * num // den:(b - h0) * num // den, (c - w0) * num // den:(d - w0) * num // den],
                    non_blocking=True)
        if self.pin and out is None:  # the copies into host memory done before the host reads windows of it
            torch.cuda.current_stream(self.device).synchronize()
        result = Stored(dest, band=(o0, o1), rows=(m0, m1), height=ho, filled=self.world == 1)
        if out is not None and self.world > 1:
            self._gather_bands(result)
        return result

    def _plan_local(self, fn, inputs, reach, scale, out, band) -> Stored:
        num, den = scale
        h, w = inputs[0].size
        th = min(h, min(self.tile, band[1] - band[0]) + 2 * reach)
        tw = min(w, min(self.tile, w) + 2 * reach)
        windows = [x.data[..., :th, :tw] for x in inputs]
        y = fn(*(x if i.pre is None else i.pre(x) for x, i in zip(windows, inputs)))
        win = sum(x.numel() * x.element_size() for x in windows)
        # Per input: the read copy, the norm's float32 output, its activation; fn's output, temporaries, the crop.
        self.work = max(self.work, 3 * win + 4 * y.numel() * y.element_size())
        o0, o1, ho = band[0] * num // den, band[1] * num // den, h * num // den
        if out is not None:
            return Stored(out, band=(o0, o1))
        m0, m1 = (max(0, o0 - MARGIN), min(ho, o1 + MARGIN)) if self.world > 1 else (0, ho)
        return Stored(self._alloc((*y.shape[:-2], m1 - m0, w * num // den), y.dtype), band=(o0, o1), rows=(m0, m1),
                      height=ho)

    # ----- ranks: margins from the neighbours, whole frames from all ------------------------------------------------
    def _exchange(self, x: Stored, reach: int) -> None:
        """Fill x's margins (`reach` rows) from the neighbouring ranks' bands."""
        if x.filled or reach == 0:
            return
        if reach > MARGIN:
            raise RuntimeError(f"a segment reads {reach} rows beyond its band, more than the margin {MARGIN}")
        if self.plan_only:
            x.filled = True
            return
        b0, b1 = x.band
        r0 = x.rows[0]
        if b1 - b0 < reach:
            raise UserError(f"parallel tiling: bands of {b1 - b0} rows are too thin for {self.world} ranks "
                            f"(a layer reads {reach} rows of its neighbours): use fewer ranks for this frame size")
        ops, recvs = [], []
        for peer, send, recv in ((self.rank - 1, b0, b0 - reach), (self.rank + 1, b1 - reach, b1)):
            if not 0 <= peer < self.world:
                continue
            # Messages on the compute device: NCCL takes no host tensors, and a copy on the device's stream is
            # ordered after the pending copies into host memory where a host-side read is not.
            rows = x.data[..., send - r0:send - r0 + reach, :].to(self.device, non_blocking=True).contiguous()
            ops.append(dist.P2POp(dist.isend, rows, self._peer(peer), self.group))
            buf = torch.empty_like(rows)
            ops.append(dist.P2POp(dist.irecv, buf, self._peer(peer), self.group))
            recvs.append((recv, buf))
        for req in dist.batch_isend_irecv(ops) if ops else ():
            req.wait()
        for start, buf in recvs:
            x.data[..., start - r0:start - r0 + reach, :] = buf
        x.filled = True

    def _peer(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not dist.group.WORLD else rank

    def _gather_bands(self, x: Stored) -> torch.Tensor:
        """The whole frame of x in x.data (every rank's band gathered into it); x.data must be whole-sized."""
        bands = [torch.zeros(2, dtype=torch.long, device=self.device) for _ in range(self.world)]
        dist.all_gather(bands, torch.tensor(x.band, device=self.device), group=self.group)
        bands = [b.tolist() for b in bands]
        longest = max(b - a for a, b in bands)
        mine = torch.zeros((*x.data.shape[:-2], longest, x.data.shape[-1]), dtype=x.data.dtype, device=self.device)
        mine[..., :x.band[1] - x.band[0], :] = x.own()
        got = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(got, mine, group=self.group)
        for (a, b), g in zip(bands, got):
            x.data[..., a - x.rows[0]:b - x.rows[0], :] = g[..., :b - a, :]
        return x.data

    # ----- whole-frame reductions --------------------------------------------------------------------------------
    def statistics(self, x: Stored, groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per (sample, group) mean and biased variance of the whole frame (this rank's band, merged over ranks)."""
        n = x.data.shape[0]
        if self.plan_only:
            return x.data.new_zeros(n, groups, dtype=torch.float32), x.data.new_ones(n, groups, dtype=torch.float32)
        data = x.own()
        per_row = data[0].numel() // max(1, data.shape[-2])
        # Chunks of about a tile's elements (with the tile's channels taken as 64).
        rows = max(1, self.tile ** 2 * 64 // max(1, per_row))
        acc = None
        for r in range(0, data.shape[-2], rows):
            v = data[..., r:r + rows, :].to(self.device, non_blocking=True).reshape(n, groups, -1).float()
            var, mean = torch.var_mean(v, -1, correction=0)
            acc = _merge(acc, (v.shape[-1], mean.double(), var.double() * v.shape[-1]))
        if self.world > 1:
            acc = self._merge_ranks(acc, n, groups)
        cnt, mean, m2 = acc
        return mean.float(), (m2 / cnt).float()

    def _merge_ranks(self, acc, n: int, groups: int):
        mine = torch.zeros(3, n, groups, dtype=torch.float64, device=self.device)
        if acc is not None:
            mine[0], mine[1], mine[2] = acc[0], acc[1], acc[2]
        got = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(got, mine, group=self.group)
        total = None
        for g in got:
            if float(g[0].max()) > 0:
                total = _merge(total, (g[0], g[1], g[2]))
        return total

    def norm(self, x: Stored, gn: nn.GroupNorm, act: Optional[nn.Module] = None) -> Stored:
        """x as the next segment reads it: normalised with its whole-frame statistics, then `act`."""
        if x.pre is not None:
            raise RuntimeError("norm of an already normalised frame")
        if not isinstance(gn, nn.GroupNorm):
            raise Unsupported(f"a {type(gn).__name__} where a GroupNorm was expected")
        mean, var = self.statistics(x, gn.num_groups)
        return x.with_pre(lambda v: _normalise(gn, mean, var, act, v))

    def whole(self, x: Stored) -> torch.Tensor:
        """The whole frame of x on the compute device (ranks: their bands gathered)."""
        if self.world == 1:
            return x.data.to(self.device)
        shape = (*x.data.shape[:-2], x.height, x.data.shape[-1])
        if self.plan_only:  # counted: the gathered frame is held while it is read
            return self._alloc(shape, x.data.dtype)
        full = Stored(torch.empty(shape, dtype=x.data.dtype, device=self.device), band=x.band, height=x.height)
        full.own().copy_(x.own())
        return self._gather_bands(full)


# ----- the networks' programs -----------------------------------------------------------------------------------
def _reach(*modules: Optional[nn.Module]) -> int:
    """H/W pixels beyond an output pixel that a chain of these modules' convolutions reads (an upper bound)."""
    total = 0
    for part in modules:
        for m in () if part is None else part.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                total += max(d * (k // 2) for k, d in zip(m.kernel_size[-2:], m.dilation[-2:]))
    return total


def _residual_block(ex: Executor, x: Stored, norm1, conv1, norm2, conv2, act, shortcut=None, scale: float = 1.0,
                    middle: Optional[nn.Module] = None) -> Stored:
    """norm1 -> act -> conv1 -> norm2 -> act -> (middle) -> conv2, plus x (through `shortcut`), / scale."""
    h = ex.local(conv1, [ex.norm(x, norm1, act)], _reach(conv1))

    def tail(v, skip):
        v = conv2(v if middle is None else middle(v))
        skip = skip if shortcut is None else shortcut(skip.contiguous())
        out = skip + v
        return out if scale == 1.0 else out / scale

    return ex.local(tail, [ex.norm(h, norm2, act), x], max(_reach(conv2), _reach(shortcut)))


def _resnet2d(ex: Executor, r, x: Stored) -> Stored:
    """diffusers ResnetBlock2D without time embedding (the VAEs' blocks)."""
    if (r.upsample is not None or r.downsample is not None or r.time_emb_proj is not None
            or getattr(r, "time_embedding_norm", "default") == "scale_shift"):
        raise Unsupported("ResnetBlock2D with resampling or a time embedding")
    return _residual_block(ex, x, r.norm1, r.conv1, r.norm2, r.conv2, r.nonlinearity, r.conv_shortcut,
                           r.output_scale_factor, middle=r.dropout)


def _downsample2d(ex: Executor, d, x: Stored) -> Stored:
    if d.norm is not None or not d.use_conv or d.conv.stride != (2, 2):
        raise Unsupported("Downsample2D other than a stride-2 convolution")

    def fn(v):
        return d.conv(F.pad(v, (0, 1, 0, 1)) if d.padding == 0 else v)

    return ex.local(fn, [x], _reach(d.conv) + 1, scale=(1, 2))


def _upsample2d(ex: Executor, u, x: Stored) -> Stored:
    if u.norm is not None or u.use_conv_transpose or not u.interpolate:
        raise Unsupported("Upsample2D other than nearest 2x (+ convolution)")
    return ex.local(lambda v: u(v), [x], -(-_reach(u.conv) // 2) if u.use_conv else 0, scale=(2, 1))


def _linear(layer: nn.Linear, v: torch.Tensor) -> torch.Tensor:
    """A per-pixel linear layer over (N, C, h, w)."""
    return F.linear(v.movedim(1, -1), layer.weight, layer.bias).movedim(-1, 1)


def _attention(ex: Executor, attn, x: Stored) -> Stored:
    """diffusers Attention (AttnProcessor / AttnProcessor2_0 self-attention): every query tile over the whole
    frame's keys and values."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if (type(attn.processor) not in (AttnProcessor, AttnProcessor2_0) or attn.spatial_norm is not None
            or attn.norm_q is not None or attn.norm_k is not None):
        raise Unsupported("an attention other than diffusers' plain self-attention")
    normed = ex.norm(x, attn.group_norm) if attn.group_norm is not None else x
    kv = ex.whole(ex.local(lambda v: torch.cat([_linear(attn.to_k, v), _linear(attn.to_v, v)], 1), [normed], 0))
    k, v = (rearrange(t, "n (g d) h w -> n g (h w) d", g=attn.heads) for t in kv.chunk(2, 1))

    def fn(tn, tr):
        q = rearrange(_linear(attn.to_q, tn), "n (g d) h w -> n g (h w) d", g=attn.heads)
        # AttnProcessor2_0's call (its default scale); AttnProcessor's softmax(q k^T * scale) is the same math.
        o = F.scaled_dot_product_attention(q, k, v).to(q.dtype)
        o = attn.to_out[1](attn.to_out[0](rearrange(o, "n g (h w) d -> n h w (g d)", h=tn.shape[-2])))
        o = o.movedim(-1, 1)
        if attn.residual_connection:
            o = o + tr
        return o / attn.rescale_output_factor

    return ex.local(fn, [normed, x], 0)


def _mid_block(ex: Executor, mid, x: Stored) -> Stored:
    x = _resnet2d(ex, mid.resnets[0], x)
    for attn, r in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            x = _attention(ex, attn, x)
        x = _resnet2d(ex, r, x)
    return x


def _check_autoencoderkl(net) -> None:
    if type(net.conv_norm_out) is not nn.GroupNorm:
        raise Unsupported("an AutoencoderKL without a GroupNorm output norm (e.g. spatial norm)")
    for block in getattr(net, "down_blocks", ()):
        if type(block).__name__ != "DownEncoderBlock2D":
            raise Unsupported(f"down block {type(block).__name__}")
    for block in getattr(net, "up_blocks", ()):
        if type(block).__name__ != "UpDecoderBlock2D":
            raise Unsupported(f"up block {type(block).__name__}")


def autoencoderkl_encode(ex: Executor, vae, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """diffusers AutoencoderKL `_encode`: (n, C, H, W) frames -> moments (n, 2 * latent, H / f, W / f)."""
    enc = vae.encoder
    _check_autoencoderkl(enc)
    v = ex.local(enc.conv_in, [ex.frame(x, align=2 ** len([b for b in enc.down_blocks if b.downsamplers]))],
                 _reach(enc.conv_in))
    for block in enc.down_blocks:
        for r in block.resnets:
            v = _resnet2d(ex, r, v)
        for d in block.downsamplers or ():
            v = _downsample2d(ex, d, v)
    v = _mid_block(ex, enc.mid_block, v)

    def tail(t):
        t = enc.conv_out(t)
        return t if vae.quant_conv is None else vae.quant_conv(t)

    if out is None:
        factor = x.shape[-1] // v.size[1]
        out = x.new_empty((x.shape[0], 2 * vae.config.latent_channels, *(s // factor for s in x.shape[-2:])))
    return ex.local(tail, [ex.norm(v, enc.conv_norm_out, enc.conv_act)], _reach(enc.conv_out), out=out).data


def autoencoderkl_decode(ex: Executor, vae, z: torch.Tensor, out: Optional[torch.Tensor] = None,
                         divisor: float = 1.0) -> torch.Tensor:
    """diffusers AutoencoderKL `_decode` of `z / divisor`: (n, latent, h, w) -> (n, C, h * f, w * f)."""
    dec = vae.decoder
    _check_autoencoderkl(dec)

    def head(t):
        t = t / divisor
        return dec.conv_in(t if vae.post_quant_conv is None else vae.post_quant_conv(t))

    v = ex.local(head, [ex.frame(z)], _reach(vae.post_quant_conv, dec.conv_in))
    v = _mid_block(ex, dec.mid_block, v)
    for block in dec.up_blocks:
        for r in block.resnets:
            v = _resnet2d(ex, r, v)
        for u in block.upsamplers or ():
            v = _upsample2d(ex, u, v)
    if out is None:
        factor = v.size[1] // z.shape[-1]
        out = z.new_empty((z.shape[0], dec.conv_out.out_channels, *(s * factor for s in z.shape[-2:])))
    return ex.local(dec.conv_out, [ex.norm(v, dec.conv_norm_out, dec.conv_act)], _reach(dec.conv_out), out=out).data


def _temporal_res(ex: Executor, b, x: Stored) -> Stored:
    return _residual_block(ex, x, b.norm1, b.conv1, b.norm2, b.conv2, b.act, b.conv3)


def temporal_encode(ex: Executor, vae, x: torch.Tensor) -> torch.Tensor:
    """The temporal VAE's `quant_conv(encoder(x))` for a time-padded (B, C, T, H, W) input."""
    enc = vae.encoder
    v = ex.local(enc.conv_in, [ex.frame(x)], _reach(enc.conv_in))
    for i, blocks in enumerate(enc.block_res_blocks):
        for b in blocks:
            v = _temporal_res(ex, b, v)
        if i < len(enc.conv_blocks) and not isinstance(enc.conv_blocks[i], nn.Identity):
            v = ex.local(enc.conv_blocks[i], [v], _reach(enc.conv_blocks[i]))
    for b in enc.res_blocks:
        v = _temporal_res(ex, b, v)
    t = v.data.shape[2]
    out = x.new_empty((x.shape[0], vae.quant_conv.conv.out_channels, t, *x.shape[-2:]))
    return ex.local(lambda u: vae.quant_conv(enc.conv2(u)), [ex.norm(v, enc.norm1, enc.act)], 0, out=out).data


def temporal_decode(ex: Executor, vae, z: torch.Tensor, pad: int) -> torch.Tensor:
    """The temporal VAE's `decoder(post_quant_conv(z))[:, :, pad:]`."""
    dec = vae.decoder
    v = ex.local(lambda u: dec.conv1(vae.post_quant_conv(u)), [ex.frame(z)], _reach(dec.conv1))
    for b in dec.res_blocks:
        v = _temporal_res(ex, b, v)
    for i in reversed(range(len(dec.block_res_blocks))):
        for b in dec.block_res_blocks[i]:
            v = _temporal_res(ex, b, v)
        if i > 0:
            conv, up = dec.conv_blocks[i - 1], dec.temporal_upsample[i - 1]
            if up:
                v = ex.local(lambda u, conv=conv: rearrange(conv(u), "b (c ts) t h w -> b c (t ts) h w", ts=2), [v],
                             _reach(conv))
            elif not isinstance(conv, nn.Identity):
                v = ex.local(conv, [v], _reach(conv))
    t = v.data.shape[2] - pad
    out = z.new_empty((z.shape[0], dec.conv_out.conv.out_channels, t, *z.shape[-2:]))
    return ex.local(lambda u: dec.conv_out(u)[:, :, pad:], [ex.norm(v, dec.norm1, dec.act)], _reach(dec.conv_out),
                    out=out).data


def fake_mode():
    """FakeTensorMode for planning (shapes and bytes only, real parameters allowed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def run_program(program: Callable, *args, device: torch.device, tile: int, store: str = "device", group=None,
                **kwargs) -> torch.Tensor:
    """program(executor, *args, **kwargs) for real."""
    return program(Executor(device, tile, store, group=group), *args, **kwargs)


def plan_program(program: Callable, *args, device: torch.device, tile: int, store: str = "device", group=None,
                 **kwargs) -> Tuple[int, int]:
    """(peak bytes of stored frames, largest tile's working set) of program(...) at these settings, computed on
    fake tensors (nothing runs)."""
    ex = Executor(device, tile, store, plan_only=True, group=group)
    with fake_mode() as mode, torch.no_grad():
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        kw = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        program(ex, *fake, **kw)
    return ex.peak, ex.work


# ----- the plan: where segment outputs live, the tile size, or the low-memory path --------------------------------
MIN_TILE = 64


class Plan(NamedTuple):
    path: str  # "exact" (this module) or "recompute" (tiling.run_tiled: one tile's memory, approximate)
    tile: int
    store: str = "device"  # exact path: where segment outputs live ("device" / "host")
    need: int = 0  # bytes the plan expects to hold beyond the call's input and output (0: no budget given)


AUTO_SHARE = 0.9  # of the free memory: headroom for the allocator's fragmentation and for other threads


def available_memory(device: torch.device) -> int:
    """A budget for max_memory="auto": AUTO_SHARE of what the device has free now (CUDA: free memory plus what the
    caching allocator holds unused; CPU: the kernel's MemAvailable)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(
            device)
    else:
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):  # not Linux
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(free * AUTO_SHARE)


def _tiles(start: int) -> List[int]:
    sizes = [start]
    while sizes[-1] // 2 >= MIN_TILE:
        sizes.append(sizes[-1] // 2)
    return sizes if sizes[-1] <= MIN_TILE else sizes + [MIN_TILE]


def make_plan(budget: Optional[int], tile: int, program: Callable, *args, device: torch.device, group=None,
              **kwargs) -> Plan:
    """The fastest plan whose estimated memory fits `budget` bytes: segment outputs on the device at the largest
    tile that fits, else (CUDA) in pinned host memory, else tiles recomputed per GroupNorm (memory one tile's:
    estimated as twice the exact path's working set at that tile). None: no budget."""
    if budget is None:
        return Plan("exact", tile)
    costs = {t: plan_program(program, *args, device=device, tile=t, group=group, **kwargs) for t in _tiles(tile)}
    for store in ("device", "host") if device.type == "cuda" else ("device",):
        for t, (peak, work) in costs.items():
            need = (peak if store == "device" else 0) + work
            if need <= budget:
                return Plan("exact", t, store, need)
    floor = None
    for t, (_, work) in costs.items():
        need = 2 * work
        if need <= budget:
            return Plan("recompute", t, "device", need)
        floor = need
    raise UserError(f"tiling max_memory={budget} bytes ({budget / 2**20:.0f} MiB) is below the smallest budget that "
                    f"works for a {tuple(args[1].shape)} input: {floor} bytes ({-(-floor // 2**20)} MiB, tiles of "
                    f"{MIN_TILE} recomputed per GroupNorm)")
