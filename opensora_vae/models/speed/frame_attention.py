"""Exact self-attention of a diffusers `Attention` for one tile's queries over the whole frame's keys/values.

Keys/values arrive part by part (e.g. recomputed key tile by key tile) and meet the queries in an online softmax
(running max, running sum and a float32 accumulator), so neither the frame's keys/values nor the N x N scores are
ever held: memory is the tile's queries plus one key part and one chunk of scores.
"""
from __future__ import annotations

from typing import Iterable

import torch
from einops import rearrange


def frame_attention(attn, x: torch.Tensor, kv_inputs: Iterable[torch.Tensor], score_elems: int = 2**22) -> torch.Tensor:
    """`attn(x)` (AttnProcessor / AttnProcessor2_0 semantics, self-attention, no mask) for x (B, C, h, w), with
    keys/values from `kv_inputs` instead of x: the attention's input over parts of the frame (B, C, h_j, w_j) that
    together cover it once (any partition, any order). x itself need not be one of them.

    Each part goes through `attn.group_norm` as it arrives, after x's own norm call: a producer that replays the
    frame's GroupNorm statistics (tiling's `_NormTap.nested`) may hold its context open across its yield.
    score_elems: the most scores held at once (queries are chunked to fit one key part).
    """
    if attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None:
        raise NotImplementedError("frame_attention: spatial_norm / norm_q / norm_k are not supported")
    b, _, h, w = x.shape

    def normed(t):
        t = rearrange(t, "b c h w -> b c (h w)")
        t = attn.group_norm(t) if attn.group_norm is not None else t
        return t.transpose(1, 2)

    def heads(t):
        return rearrange(t, "b n (g d) -> b g n d", g=attn.heads).float()

    q = heads(attn.to_q(normed(x))) * attn.scale
    n = q.shape[2]
    run_max = q.new_full(q.shape[:3], float("-inf"))
    run_sum = q.new_zeros(q.shape[:3])
    acc = None
    for part in kv_inputs:
        part = normed(part)
        k, v = heads(attn.to_k(part)).transpose(-1, -2), heads(attn.to_v(part))
        if acc is None:
            acc = q.new_zeros(*q.shape[:3], v.shape[-1])
        rows = max(1, score_elems // (b * attn.heads * k.shape[-1]))
        for i in range(0, n, rows):
            r = slice(i, i + rows)
            s = q[:, :, r] @ k
            new_max = torch.maximum(run_max[:, :, r], s.amax(-1))
            keep = (run_max[:, :, r] - new_max).exp()  # rescales what earlier parts contributed
            p = (s - new_max[..., None]).exp_()
            run_sum[:, :, r] = run_sum[:, :, r] * keep + p.sum(-1)
            acc[:, :, r] = acc[:, :, r] * keep[..., None] + p @ v
            run_max[:, :, r] = new_max
    if acc is None:
        raise ValueError("frame_attention: no key/value parts")
    out = rearrange(acc / run_sum[..., None], "b g n d -> b n (g d)").to(x.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    out = rearrange(out, "b (h w) c -> b c h w", h=h, w=w)
    if attn.residual_connection:
        out = out + x
    return out / attn.rescale_output_factor
