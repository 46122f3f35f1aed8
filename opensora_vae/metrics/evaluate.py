"""Folder-vs-folder evaluation behind `eval/vae/eval_common_metric.py`.

Each metric gives one value per frame (FloLPIPS: NaN on the last frame, see flolpips.py); a video's value is
the nan-mean over its frames, and a metric's `mean` / `std` are the mean and population std (ddof 0) over
videos. The reference script instead averages, over batches, each batch's per-timestamp means (the mean over
the batch's videos at frame t), which gives the videos of a short last batch more weight. With equal-length
clips the two agree when every batch is full (the number of videos divisible by `batch_size`, e.g. 100 videos
at batch size 2, the published setting, or batch size 1); per-video means do not depend on the batch size.

`fvd` adds rFVD (fvd.py: cd-fvd's I3D on the first 16 frames, Frechet distance of the two sets' features), one
value for the whole set; with several ranks the features are gathered and summed in batch order, so the value is
that of one rank.

`temporal` adds the weight-free temporal scores of temporal.py (seam dip and jump at the pipeline's 17-frame
micro-chunk boundaries, `chunk_frames`; temporal consistency), each summarised the same way; the per-boundary
values are under "seams".

A metric whose pretrained weights are not on disk (MissingWeightsError) is reported as unavailable with the
reason and the others still run. Asking for CUDA when it is unavailable is an error (no silent CPU fallback:
a long evaluation should not quietly run on the wrong device).
"""
from __future__ import annotations

import math
import os
import sys
from typing import Callable, Dict, Optional, Sequence, Union

import torch

from opensora_vae import storage
from opensora_vae.distributed import gather_shares, rank_world
from opensora_vae.perceptual import MissingWeightsError
from opensora_vae.runtime import resolve_device

from .flolpips import flolpips, get_flow_model
from .lpips import get_lpips_model, lpips
from .pairs import iter_batches, pair_videos
from .psnr import psnr
from .fvd import FEATURE_DIM, NUM_FRAMES, FVDAccumulator, get_i3d
from .ssim import ssim
from .temporal import MICRO_FRAME_SIZE, summarize, temporal_scores

__all__ = ["METRICS", "evaluate", "format_table", "resolve_device"]

METRICS = ("ssim", "psnr", "lpips", "flolpips", "fvd", "temporal")
PathLike = Union[str, os.PathLike]


def _build_flolpips(device, backbone, pwcnet_weights, random_weights):
    """The FloLPIPS scorer, or the reasons it cannot run (both models are tried so every missing file is named)."""
    loaders = (
        lambda: get_lpips_model("alex", backbone, random_weights, device),
        lambda: get_flow_model(pwcnet_weights, device, random_init=random_weights),
    )
    models, missing = [], []
    for load in loaders:
        try:
            models.append(load())
        except MissingWeightsError as e:
            missing.append(str(e))
    if missing:
        return None, "\n".join(missing + ["(CLI: --flolpips-backbone / --lpips-backbone, --pwcnet-weights)"])
    lp, flow = models
    return (lambda a, b: flolpips(a, b, lpips_model=lp, flow_model=flow)), None


def build_frame_metrics(
    metrics: Sequence[str], device: torch.device, num_frames: int, lpips_net: str,
    lpips_backbone: Optional[PathLike], flolpips_backbone: Optional[PathLike],
    pwcnet_weights: Optional[PathLike], random_weights: bool,
) -> tuple:
    """(name -> fn(real, gen) -> (B, T), name -> reason) with every model loaded up front."""
    fns: Dict[str, Callable] = {"ssim": ssim, "psnr": psnr}
    fns = {m: fns[m] for m in metrics if m in fns}  # per frame; "temporal" is per clip (evaluate)
    unavailable: Dict[str, str] = {}
    if "lpips" in metrics:
        try:
            model = get_lpips_model(lpips_net, lpips_backbone, random_weights, device)
            fns["lpips"] = lambda a, b: lpips(a, b, model=model)
        except MissingWeightsError as e:
            unavailable["lpips"] = f"{e}\n(CLI: --lpips-backbone PATH)"
    if "flolpips" in metrics:
        if num_frames < 2:
            unavailable["flolpips"] = f"FloLPIPS needs at least 2 frames per clip (num_frames={num_frames})"
        else:
            # FloLPIPS is defined on AlexNet LPIPS; reuse the LPIPS backbone file only when it is AlexNet's
            backbone = flolpips_backbone if flolpips_backbone is not None else (
                lpips_backbone if lpips_net == "alex" else None)
            fn, reason = _build_flolpips(device, backbone, pwcnet_weights, random_weights)
            if fn is None:
                unavailable["flolpips"] = reason
            else:
                fns["flolpips"] = fn
    return fns, unavailable


def build_fvd(metrics, device, num_frames: int, weights, random_weights: bool, unavailable: Dict[str, str]):
    """The I3D extractor for rFVD, or None (the reason in `unavailable`)."""
    if "fvd" not in metrics:
        return None
    if num_frames < NUM_FRAMES:
        unavailable["fvd"] = f"rFVD scores the first {NUM_FRAMES} frames of each clip (num_frames={num_frames})"
        return None
    try:
        return get_i3d(weights, random_weights, device)
    except MissingWeightsError as e:
        unavailable["fvd"] = f"{e}\n(CLI: --i3d-weights PATH)"
        return None


def _fvd_result(features, unavailable: Dict[str, str]) -> Optional[dict]:
    """rFVD from per-batch features added in batch order (the same sums whatever the number of ranks)."""
    acc = FVDAccumulator(dim=FEATURE_DIM)
    for real, fake in features:
        acc.add_features(real, fake)
    try:
        value = acc.compute()
    except ValueError as e:  # fewer than 2 clips
        unavailable["fvd"] = str(e)
        return None
    n = sum(f[0].shape[0] for f in features)
    return {"available": True, "mean": value, "std": 0.0, "num_videos": n, "per_video": {}}


def _summary(per_video: Dict[str, float]) -> dict:
    vals = torch.tensor(list(per_video.values()), dtype=torch.float64)
    return {
        "available": True,
        "mean": float(vals.mean()),
        "std": float(vals.std(unbiased=False)),
        "num_videos": len(per_video),
        "per_video": per_video,
    }


def evaluate(
    real_video_dir: PathLike,
    generated_video_dir: PathLike,
    metrics: Sequence[str] = METRICS,
    *,
    batch_size: int = 2,
    num_frames: int = 17,
    sample_rate: int = 1,
    sample_fps: Optional[float] = None,
    resolution: Optional[int] = 256,
    crop_size: Optional[int] = 256,
    subset_size: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    lpips_net: str = "alex",
    lpips_backbone: Optional[PathLike] = None,
    flolpips_backbone: Optional[PathLike] = None,
    pwcnet_weights: Optional[PathLike] = None,
    random_weights: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    chunk_frames: Optional[int] = MICRO_FRAME_SIZE,
    i3d_weights: Optional[PathLike] = None,
) -> dict:
    """Score every real/generated pair; returns {"config", "videos", "metrics": {name: summary or unavailable}}.

    `sample_fps` is recorded only: the reference sampler ignores it (see pairs.py). `random_weights=True`
    runs LPIPS / FloLPIPS with random trunks (meaningless values; tests only).
    """
    metrics = list(dict.fromkeys(metrics))
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"unknown or no metrics {bad}; choose from {', '.join(METRICS)}")
    dev = resolve_device(device)
    pairs = pair_videos(real_video_dir, generated_video_dir, subset_size)
    fns, unavailable = build_frame_metrics(
        metrics, dev, num_frames, lpips_net, lpips_backbone, flolpips_backbone, pwcnet_weights, random_weights
    )
    i3d = build_fvd(metrics, dev, num_frames, i3d_weights, random_weights, unavailable)
    # per batch: ({metric: {video: value}}, {video: temporal scores}, (real, reconstructed) rFVD features or None)
    done = []
    rank, world = rank_world()
    batches = iter_batches(pairs, batch_size, num_frames, sample_rate, resolution, crop_size, num_workers,
                           rank, world)
    if progress and rank == 0:
        try:
            from tqdm import tqdm

            batches = tqdm(batches, total=math.ceil(math.ceil(len(pairs) / batch_size) / world), desc="eval",
                           file=sys.stderr)
        except ImportError:
            pass
    with torch.no_grad():
        for batch in batches:
            real, gen = batch.real.to(dev), batch.generated.to(dev)
            values = {name: dict(zip(batch.names, fn(real, gen).double().nanmean(dim=1).cpu().tolist()))
                      for name, fn in fns.items()}
            temporal = dict(zip(batch.names, temporal_scores(real, gen, chunk=chunk_frames or None))) \
                if "temporal" in metrics else {}
            done.append((values, temporal, None if i3d is None else (i3d(real).cpu(), i3d(gen).cpu())))
    done = gather_shares(done, world)  # every rank's batches, in the order one rank gives
    per_video = {name: {k: v for values, _, _ in done for k, v in values[name].items()} for name in fns}
    per_clip = {k: v for _, temporal, _ in done for k, v in temporal.items()}
    features = [f for _, _, f in done if f is not None]

    config = dict(
        real_video_dir=storage.redact(real_video_dir), generated_video_dir=storage.redact(generated_video_dir),
        batch_size=batch_size,
        ranks=world,
        num_frames=num_frames, sample_rate=sample_rate, sample_fps=sample_fps, resolution=resolution,
        crop_size=crop_size, subset_size=subset_size, device=str(dev), lpips_net=lpips_net,
        lpips_backbone=None if lpips_backbone is None else str(lpips_backbone),
        flolpips_backbone=None if flolpips_backbone is None else str(flolpips_backbone),
        pwcnet_weights=None if pwcnet_weights is None else str(pwcnet_weights), random_weights=random_weights,
        chunk_frames=chunk_frames, i3d_weights=None if i3d_weights is None else str(i3d_weights),
    )
    results = {}
    if i3d is not None:
        results_fvd = _fvd_result(features, unavailable)
    for name in metrics:
        if name == "fvd" and name not in unavailable:
            results[name] = results_fvd
        elif name == "temporal":
            results.update(summarize(per_clip))
        elif name in unavailable:
            results[name] = {"available": False, "reason": unavailable[name]}
        else:
            results[name] = _summary(per_video[name])
    report = {"config": config, "videos": [p.name for p in pairs], "metrics": results}
    if "temporal" in metrics:
        report["seams"] = {clip: v["per_boundary"] for clip, v in per_clip.items()}
    return report


def format_table(result: dict) -> str:
    """Plain-text table: one row per metric with mean, std and video count, or why it did not run."""
    rows = [f"{'metric':<24} {'mean':>12} {'std':>12} {'videos':>7}"]
    for name, r in result["metrics"].items():
        if r["available"]:
            std = f"{r['std']:>12.6f}" if r["per_video"] else f"{'-':>12}"  # one value for the set (rFVD)
            rows.append(f"{name:<24} {r['mean']:>12.6f} {std} {r['num_videos']:>7d}")
        else:
            rows.append(f"{name:<24} {'unavailable':>12}  (see below)")
    for name, r in result["metrics"].items():
        if not r["available"]:
            rows.append(f"\n{name} unavailable: " + r["reason"].replace("\n", "\n  "))
    return "\n".join(rows)
