"""Temporal artefact scores of a reconstruction, weight-free: the seam dip at micro-chunk boundaries and temporal
consistency.

Videos are (B, T, C, H, W) in [0, 1], as for `psnr` / `ssim`; every function returns one dict per clip (a list of
B dicts), built from float64 sums, with only JSON-safe values: a score with no frames to average over is None
(null), never NaN (evaluate's JSON is written with `json.dumps`, which would write a bare, invalid `NaN`).

Where the seams are (`chunk_boundaries`). The pipeline (models/pipeline.py, `VideoAutoencoderPipeline._chunks`,
used by `_encode` and `_temporal_decode_chunks`) cuts the spatial latents, one per frame (the spatial VAE is 2-D,
frame by frame), into micro-chunks [0, 17), [17, 34), ...; the last one holds the T % 17 frames left (when not 0).
Each chunk goes through the temporal VAE on its own: `VAE_Temporal.encode` front-pads it with zero frames to a
multiple of 4 (17 -> 3 padding frames) and `decode` drops the same padding, so the padding stays inside the chunk
and shifts nothing: chunk k decodes exactly frames 17 k .. 17 k + 16. New chunks start at 17, 34, ... < T; a clip
of at most 17 frames (or `micro_frame_size=None`) is decoded in one chunk and has no seam. The model's spatial
tiles (`enable_tiling`, including the temporal VAE's tiles) split H/W, not time, so they add no boundary in time;
other splits in time (a video decoded in windows, another micro_frame_size) are passed as an explicit list.

Definitions, per clip (a boundary b lies between frames b - 1 and b, 1 <= b <= T - 1; `window` = w >= 1):
- distance of frame t to b: b - t for t < b, t - b + 1 for t >= b (frames b - 1 and b are at distance 1);
- seam frames of b: distance <= w, i.e. frames b - w .. b + w - 1 clipped to the clip; seam frames of the clip:
  those of any boundary; interior frames: all others (at least w + 1 from every boundary). Frame 0 starts a chunk
  too but is no seam (nothing before it to differ from) and counts as interior;
- per-frame PSNR is `psnr` (dB, 100 for identical frames); `seam_psnr` / `interior_psnr` are the means over the
  seam / interior frames (the mean of per-frame dB, as evaluate averages PSNR); `seam_dip_db` = interior - seam,
  positive when the reconstruction is worse at seams; per boundary, its own seam frames' mean and dip;
- step s (1 <= s <= T - 1) goes from frame s - 1 to s; the boundary step of b is s = b; an interior step joins two
  interior frames. Jump of a step: J_s = 255 (mean |rec_s - rec_{s-1}| - mean |orig_s - orig_{s-1}|), means over
  C, H, W, in 8-bit levels: how much more the reconstruction changes across the step than the original did (a
  "pop"); the original's motion is in both terms, so steady motion cancels. `seam_jump` / `interior_jump`: means
  over the boundary / interior steps; `seam_jump_excess` = seam - interior; per boundary its J_b and excess. A
  quality drop that persists after a boundary (noise on the whole next chunk) shows in the dip, not the jump; a
  step in brightness or colour shows in the jump;
- no boundary (one chunk): seam_psnr and seam_jump are None, seam_dip_db and seam_jump_excess are 0.0 (no seam, so
  no seam penalty: flat), per_boundary is empty. No interior frame or step (seams cover the clip): the interior
  value and the dip / excess are None.

Temporal consistency: step curve TC_s = 255 mean |(rec_s - rec_{s-1}) - (orig_s - orig_{s-1})| over C, H, W, in
8-bit levels; `temporal_consistency` is its mean over steps and `temporal_consistency_max` its max (None for a
one-frame clip). 0 for a perfect reconstruction and for any error constant in time (a fixed spatial offset); it
grows with flicker, i.e. with error that changes from frame to frame.

`summarize` averages per-clip scores over clips like evaluate's `_summary` (mean and population std, ddof 0),
skipping None.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch

from .psnr import psnr
from .ssim import _check_videos

__all__ = [
    "MICRO_FRAME_SIZE", "SCORES", "chunk_boundaries", "seam_scores", "temporal_consistency", "temporal_scores",
    "summarize",
]

MICRO_FRAME_SIZE = 17  # OpenSoraVAE_V1_2's micro_frame_size
LEVELS = 255.0  # [0, 1] differences reported in 8-bit levels: readable, and comparable across clips
SCORES = ("seam_psnr", "interior_psnr", "seam_dip_db", "seam_jump", "interior_jump", "seam_jump_excess",
          "temporal_consistency", "temporal_consistency_max")


def chunk_boundaries(num_frames: int, chunk: Optional[int] = MICRO_FRAME_SIZE) -> List[int]:
    """First frames of the 2nd, 3rd, ... micro-chunk of a clip of `num_frames` frames, as the pipeline cuts it
    (chunks of `chunk` frames from frame 0, the last one shorter; see the module docstring). chunk None: one chunk."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if chunk is None:
        return []
    if chunk < 1:
        raise ValueError(f"chunk must be a positive integer or None, got {chunk}")
    return list(range(chunk, num_frames, chunk))


def _check_boundaries(boundaries: Sequence[int], num_frames: int) -> List[int]:
    b = [int(x) for x in boundaries]
    if b != sorted(set(b)) or any(x < 1 or x > num_frames - 1 for x in b):
        raise ValueError(f"boundaries must be increasing frame indices in 1..{num_frames - 1} (a boundary starts a "
                         f"new chunk, so 0 and T are none), got {list(boundaries)}")
    return b


def _mean(values: torch.Tensor, mask: torch.Tensor) -> Optional[float]:
    return float(values[mask].mean()) if bool(mask.any()) else None


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b


def _step_stats(original: torch.Tensor, reconstruction: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per step (B, T - 1) float64, 8-bit levels: mean |Δrec|, mean |Δorig|, mean |Δrec - Δorig| over C, H, W.
    One pair of frames at a time in float64 (exact for float32 inputs), so memory does not grow with T."""
    bsz, t = original.shape[:2]
    out = {k: torch.zeros(bsz, max(t - 1, 0), dtype=torch.float64, device=original.device)
           for k in ("rec", "orig", "tc")}
    prev_o, prev_r = original[:, 0].double(), reconstruction[:, 0].double()
    for s in range(1, t):
        cur_o, cur_r = original[:, s].double(), reconstruction[:, s].double()
        d_o, d_r = cur_o - prev_o, cur_r - prev_r
        out["orig"][:, s - 1] = d_o.abs().flatten(1).mean(1)
        out["rec"][:, s - 1] = d_r.abs().flatten(1).mean(1)
        out["tc"][:, s - 1] = (d_r - d_o).abs_().flatten(1).mean(1)
        prev_o, prev_r = cur_o, cur_r
    return {k: v.mul_(LEVELS).cpu() for k, v in out.items()}


def _masks(num_frames: int, boundaries: List[int], window: int):
    """(per-boundary seam-frame masks, clip seam-frame mask, interior-step mask), all bool on CPU."""
    frames = torch.arange(num_frames)
    per = [(frames >= b - window) & (frames < b + window) for b in boundaries]
    seam = torch.zeros(num_frames, dtype=torch.bool)
    for m in per:
        seam |= m
    interior = ~seam
    steps = interior[1:] & interior[:-1]  # step s joins frames s - 1 and s
    return per, seam, steps


def seam_scores(
    original: torch.Tensor, reconstruction: torch.Tensor, boundaries: Optional[Sequence[int]] = None,
    window: int = 1, *, chunk: Optional[int] = MICRO_FRAME_SIZE,
) -> List[dict]:
    """Seam dip and jump of videos (B, T, C, H, W) in [0, 1]: one dict per clip (definitions: module docstring).

    boundaries: frame indices where a new chunk starts (the same for every clip); None: `chunk_boundaries(T,
    chunk)`, the pipeline's 17-frame micro-chunks. Each dict: boundaries, window, seam_psnr, interior_psnr,
    seam_dip_db, seam_jump, interior_jump, seam_jump_excess, and per_boundary: [{boundary, seam_psnr, dip_db,
    jump, jump_excess}].
    """
    _check_videos(original, reconstruction)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    t = original.shape[1]
    bounds = chunk_boundaries(t, chunk) if boundaries is None else _check_boundaries(boundaries, t)
    per_frame = psnr(original, reconstruction).cpu()
    steps = _step_stats(original, reconstruction)
    jump = steps["rec"] - steps["orig"]
    per_masks, seam, interior_steps = _masks(t, bounds, window)
    results = []
    for i in range(original.shape[0]):
        interior_psnr = _mean(per_frame[i], ~seam)
        interior_jump = _mean(jump[i], interior_steps)
        rows = []
        for b, m in zip(bounds, per_masks):
            seam_b = float(per_frame[i][m].mean())
            jump_b = float(jump[i, b - 1])
            rows.append(dict(boundary=b, seam_psnr=seam_b, dip_db=_diff(interior_psnr, seam_b), jump=jump_b,
                             jump_excess=_diff(jump_b, interior_jump)))
        if bounds:
            seam_psnr = _mean(per_frame[i], seam)
            seam_jump = float(jump[i, [b - 1 for b in bounds]].mean())
            dip, excess = _diff(interior_psnr, seam_psnr), _diff(seam_jump, interior_jump)
        else:  # one chunk: no seam to be worse at (documented: flat, not missing)
            seam_psnr = seam_jump = None
            dip = excess = 0.0
        results.append(dict(boundaries=bounds, window=window, seam_psnr=seam_psnr, interior_psnr=interior_psnr,
                            seam_dip_db=dip, seam_jump=seam_jump, interior_jump=interior_jump,
                            seam_jump_excess=excess, per_boundary=rows))
    return results


def temporal_consistency(original: torch.Tensor, reconstruction: torch.Tensor) -> List[dict]:
    """Per clip of videos (B, T, C, H, W) in [0, 1]: {temporal_consistency, temporal_consistency_max}, the mean and
    max over steps of 255 mean |Δrec - Δorig| (8-bit levels; None for one frame). See the module docstring."""
    _check_videos(original, reconstruction)
    tc = _step_stats(original, reconstruction)["tc"]
    if tc.shape[1] == 0:
        return [dict(temporal_consistency=None, temporal_consistency_max=None) for _ in range(tc.shape[0])]
    return [dict(temporal_consistency=float(row.mean()), temporal_consistency_max=float(row.max())) for row in tc]


def temporal_scores(
    original: torch.Tensor, reconstruction: torch.Tensor, boundaries: Optional[Sequence[int]] = None,
    window: int = 1, *, chunk: Optional[int] = MICRO_FRAME_SIZE,
) -> List[dict]:
    """`seam_scores` and `temporal_consistency` of each clip merged into one dict."""
    seams = seam_scores(original, reconstruction, boundaries, window, chunk=chunk)
    return [{**s, **c} for s, c in zip(seams, temporal_consistency(original, reconstruction))]


def summarize(per_clip: Mapping[str, Mapping[str, object]], scores: Sequence[str] = SCORES) -> Dict[str, dict]:
    """{score: summary} over clips (name -> per-clip dict): like evaluate's `_summary` (available, mean,
    population std, num_videos, per_video), over the clips where the score is not None; a score no clip has is
    {available: False, reason}."""
    out = {}
    for name in scores:
        per_video = {clip: float(v[name]) for clip, v in per_clip.items() if v.get(name) is not None}
        if not per_video:
            out[name] = {"available": False,
                         "reason": f"no clip has a {name} (no chunk boundary, no interior frame, or one frame)"}
            continue
        vals = torch.tensor(list(per_video.values()), dtype=torch.float64)
        out[name] = {"available": True, "mean": float(vals.mean()), "std": float(vals.std(unbiased=False)),
                     "num_videos": len(per_video), "per_video": per_video}
    return out
