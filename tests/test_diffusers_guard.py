"""The one place that says "diffusers changed": the installed diffusers against what this project re-implements.

opensora_vae re-implements parts of diffusers and reads its private attributes:
- `tiling.autoencoderkl_encode` / `autoencoderkl_decode`: AutoencoderKL's `_encode` / `_decode` with its Encoder /
  Decoder forward split into parts (down blocks | mid-block + head; mid-block | up blocks + head), the decoder's
  UNetMidBlock2D loop (resnets[0], then attentions and resnets[1:]) when the mid-block runs per tile, and every
  GroupNorm found as an `nn.GroupNorm` module (whole-frame statistics replayed in place of its forward);
- `frame_attention.frame_attention`: the `Attention` forward (AttnProcessor2_0 semantics) of the mid-block;
- `subpixel.Upsample2D`: Upsample2D's nearest-2x + 3x3 conv case, chosen by reading its attributes.
Each check runs the re-implementation on a tiny randomly initialised AutoencoderKL (configs/vae/tiny/widths.py's
widths, no download) against diffusers' own forward. A failure names the installed diffusers version: the
re-implementation must be re-checked against that release before pyproject.toml's diffusers bound is moved
(`make install` installs the tested release from constraints.txt).
"""
from __future__ import annotations

import copy
from typing import Optional

import diffusers
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention
from diffusers.models.upsampling import Upsample2D
from torch import nn

from opensora_vae.models.speed import frame_attention, subpixel, tiling

# Relative to the reference's largest magnitude. Measured on the tiny model: tiled with whole-frame statistics and
# enough overlap 0.8e-6 (encode) and 1.2e-6 (decode), frame attention 5e-8, sub-pixel 5e-7; a broken split or norm
# replay is off by 1e-3 or more.
REL_TOL = 1e-5


def _changed(what: str, where: str, detail: str):
    pytest.fail(
        f"DIFFUSERS CHANGED: the installed diffusers {diffusers.__version__} no longer matches what opensora_vae "
        f"re-implements in {where}: {what}. Re-check that code against diffusers {diffusers.__version__}'s "
        f"source before moving the diffusers bound in pyproject.toml (the tested release is pinned in "
        f"constraints.txt).\n{detail}",
        pytrace=False,
    )


def _run(what: str, where: str, fn):
    """fn(); an error raised by the re-implementation (a renamed attribute, a new signature) is a change too."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - any error here means diffusers' internals moved
        _changed(what, where, f"the re-implementation raised {type(err).__name__}: {err}")


def _compare(got: torch.Tensor, want: torch.Tensor, what: str, where: str, rel_tol: Optional[float]) -> None:
    """Bitwise (rel_tol None) or within rel_tol of want's largest magnitude."""
    if got.shape != want.shape:
        _changed(what, where, f"shape {tuple(got.shape)}, diffusers gives {tuple(want.shape)}")
    err = ((got - want).abs().max() / want.abs().max()).item()
    if (rel_tol is None and not torch.equal(got, want)) or (rel_tol is not None and not err <= rel_tol):
        want_str = "bitwise equal" if rel_tol is None else f"<= {rel_tol:g}"
        _changed(what, where, f"max |difference| / max |diffusers| = {err:.3g}, expected {want_str}")


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                          up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                          latent_channels=4, norm_num_groups=4, sample_size=32).eval()
    for m in model.modules():  # non-trivial affine parameters, so that a norm applied differently shows
        if isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, 0.2)
            nn.init.normal_(m.bias, 0.0, 0.2)
    return model


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_the_attributes_the_code_reads_exist(vae):
    """Every diffusers attribute opensora_vae/models/ reads (tiling, frame_attention, subpixel), where it is read."""
    enc, dec = vae.encoder, vae.decoder
    mid = dec.mid_block
    attn = mid.attentions[0] if hasattr(mid, "attentions") and len(mid.attentions) else None
    up = next((m for m in dec.modules() if isinstance(m, Upsample2D)), None)
    missing = []
    for obj, name, attrs in (
        (vae, "AutoencoderKL", ["encoder", "decoder", "quant_conv", "post_quant_conv"]),
        (enc, "Encoder", ["conv_in", "down_blocks", "mid_block", "conv_norm_out", "conv_act", "conv_out"]),
        (dec, "Decoder", ["conv_in", "mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out"]),
        (mid, "UNetMidBlock2D", ["attentions", "resnets"]),
        (attn, "Attention", ["spatial_norm", "norm_q", "norm_k", "group_norm", "heads", "scale", "to_q", "to_k",
                             "to_v", "to_out", "residual_connection", "rescale_output_factor"]),
        (up, "Upsample2D", ["interpolate", "use_conv", "use_conv_transpose", "norm", "name", "conv"]),
    ):
        if obj is None:
            missing.append(f"{name} (no such module in the AutoencoderKL)")
            continue
        missing += [f"{name}.{a}" for a in attrs if not hasattr(obj, a)]
    if missing:
        _changed("the modules' attributes", "the tiling / frame_attention / subpixel modules",
                 f"missing: {', '.join(missing)}")
    # What the re-implementations assume of their values.
    assumed = {
        "the mid-block has one attention, an Attention": len(mid.attentions) == 1 and isinstance(attn, Attention),
        "the mid-block has len(attentions) + 1 resnets": len(mid.resnets) == len(mid.attentions) + 1,
        "Attention has no spatial_norm / norm_q / norm_k": attn.spatial_norm is None and attn.norm_q is None
        and attn.norm_k is None,
        "Attention.to_out is (Linear, Dropout)": len(attn.to_out) == 2 and isinstance(attn.to_out[0], nn.Linear),
        "Attention's group_norm is an nn.GroupNorm": isinstance(attn.group_norm, nn.GroupNorm),
        "the AutoencoderKL's norms are nn.GroupNorm modules": isinstance(enc.conv_norm_out, nn.GroupNorm)
        and isinstance(dec.conv_norm_out, nn.GroupNorm),
        "Upsample2D is the nearest-2x + 3x3 conv case": up.interpolate and up.use_conv and not up.use_conv_transpose
        and up.norm is None and up.name == "conv" and isinstance(up.conv, nn.Conv2d),
    }
    wrong = [k for k, ok in assumed.items() if not ok]
    if wrong:
        _changed("the modules' structure", "the tiling / frame_attention / subpixel modules",
                 "no longer true: " + "; ".join(wrong))


@torch.no_grad()
def test_encode_split_equals_autoencoderkl_encode(vae):
    where = "tiling.autoencoderkl_encode"
    # One tile: the split (down blocks | mid-block, head, quant_conv) runs on the whole frame: the same ops.
    x = _rand(2, 3, 32, 48)
    want = vae.encode(x).latent_dist.parameters
    got = _run("AutoencoderKL.encode", where, lambda: tiling.autoencoderkl_encode(
        vae, x, tiling.TilingConfig(tile_size=48, overlap=0)))
    _compare(got, want, "AutoencoderKL.encode (one tile: the split on the whole frame)", where, None)
    # Tiles with whole-frame GroupNorm statistics and an overlap covering the down blocks' reach (8 pixels per
    # side < overlap / 4): the untiled result up to float rounding.
    x = _rand(1, 3, 96, 112, seed=1)
    cfg = tiling.TilingConfig(tile_size=80, overlap=32, exact_norms=None)
    assert len(tiling.spans(96, 80, 16)) > 1, "the frame must be split"
    want = vae.encode(x).latent_dist.parameters
    got = _run("AutoencoderKL.encode", where, lambda: tiling.autoencoderkl_encode(vae, x, cfg))
    _compare(got, want, "AutoencoderKL.encode (2 x 2 tiles, whole-frame GroupNorm statistics)", where, REL_TOL)


@pytest.mark.parametrize("tile_mid_block", [False, True])
@torch.no_grad()
def test_decode_split_equals_autoencoderkl_decode(vae, tile_mid_block):
    where = "tiling.autoencoderkl_decode" + (" (tile_mid_block: UNetMidBlock2D's loop)" if tile_mid_block else "")
    # One tile: (post_quant_conv, conv_in, mid-block | up blocks, head) on the whole frame: the same ops.
    z = _rand(2, 4, 16, 24)
    want = vae.decode(z).sample
    got = _run("AutoencoderKL.decode", where, lambda: tiling.autoencoderkl_decode(
        vae, z, tiling.TilingConfig(tile_size=48, overlap=0, tile_mid_block=tile_mid_block)))
    _compare(got, want, "AutoencoderKL.decode (one tile: the split on the whole frame)", where, None)
    # Two tiles (latent 76 rows, tiles of 72 with a halo of 16), whole-frame statistics, an overlap covering the
    # up blocks' reach (7 latent pixels < halo / 2): the untiled result up to float rounding. With tile_mid_block
    # the mid-block runs per tile too: resnets[0], frame attention over the whole frame's keys, resnets[1].
    z = _rand(1, 4, 76, 40, seed=1)
    cfg = tiling.TilingConfig(tile_size=144, overlap=64, exact_norms=None, tile_mid_block=tile_mid_block)
    assert len(tiling.spans(76, 72, 16)) > 1, "the frame must be split"
    want = vae.decode(z).sample
    got = _run("AutoencoderKL.decode", where, lambda: tiling.autoencoderkl_decode(vae, z, cfg))
    _compare(got, want, "AutoencoderKL.decode (2 tiles, whole-frame GroupNorm statistics)", where, REL_TOL)


@torch.no_grad()
def test_frame_attention_equals_the_mid_block_attention(vae):
    where = "frame_attention.frame_attention"
    attn = vae.decoder.mid_block.attentions[0]
    x = _rand(2, 32, 13, 17) * 2 + 0.5
    want = attn(x)
    got = _run("Attention.forward", where, lambda: frame_attention.frame_attention(attn, x, [x]))
    _compare(got, want, "Attention.forward (keys/values: the whole frame)", where, REL_TOL)
    # Keys/values in parts that do not divide the frame evenly, the frame's GroupNorm statistics replayed for each
    # (as tiled decoding does), queries of a window: the same rows of the whole-frame attention.
    tap = tiling._NormTap(attn)
    v = x.reshape(2, attn.group_norm.num_groups, -1)
    tap.use[0] = (v.mean(-1), v.var(-1, unbiased=False))

    def parts():
        for hs in tiling.spans(13, 5, 0):
            for ws in tiling.spans(17, 6, 0):
                with tap.nested(0):
                    yield x[..., hs.core[0]:hs.core[1], ws.core[0]:ws.core[1]]

    def windowed():
        with tap.active():
            tap.seq = 0
            return frame_attention.frame_attention(attn, x[..., 2:9, 3:11], parts(), score_elems=512)

    got = _run("Attention.forward", where, windowed)
    _compare(got, want[..., 2:9, 3:11], "Attention.forward (keys/values in parts, a window's queries)", where,
             REL_TOL)


@torch.no_grad()
def test_subpixel_upsample_equals_upsample2d(vae):
    where = "subpixel.Upsample2D"
    ref = next(m for m in vae.decoder.modules() if type(m) is Upsample2D)
    up = copy.deepcopy(ref)
    assert subpixel.use_subpixel(up) == 1 and type(up) is subpixel.Upsample2D
    x = _rand(2, ref.conv.in_channels, 12, 10)
    got = _run("Upsample2D.forward", where, lambda: up(x))
    if "_subpixel_cache" not in up.conv.__dict__:
        _changed("Upsample2D's attributes", where, "the decoder's upsampler no longer takes the sub-pixel path "
                                                   "(it fell back to diffusers' forward)")
    _compare(got, ref(x), "Upsample2D.forward (nearest 2x, 3x3 conv)", where, REL_TOL)
