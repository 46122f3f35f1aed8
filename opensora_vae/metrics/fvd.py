"""rFVD: Frechet video distance between I3D features of original and reconstructed clips.

Protocol (the I3D path of the `cd-fvd` package, CVPR 2024 "On the Content Bias in Frechet Video Distance", whose
statistics code is StyleGAN-V's `FeatureStats`):

- Frames: the first `num_frames` = 16 frames of each clip (FVD16; `num_frames=None` keeps all frames, at least 9:
  I3D's final 2x7x7 average pool needs ceil(T / 8) >= 2 temporal positions).
- Resize: every frame to 224x224, bilinear, align_corners=False, no antialiasing, on values in [0, 255] as float32;
  then scaled to [-1, 1] by 2 v / 255 - 1. These are the operations of `cdfvd.third_party.i3d.utils.preprocess_i3d`
  in the same order, so uint8 input gives bit-identical network input (tested).
- Network and layer: `cdfvd.third_party.i3d.pytorch_i3d.InceptionI3d(400)` (piergiaj's PyTorch I3D) in eval mode;
  the features are its `forward` output: the 400 Kinetics-400 logits (pre-softmax) after the 2x7x7 average pool,
  averaged over the remaining temporal positions. cd-fvd's `get_i3d_logits` uses the same output.
- Weights: cd-fvd's `i3d_pretrained_400.pt`, a plain state dict for that module (not TorchScript), which cd-fvd
  downloads from I3D_URL into its package folder. Here nothing is downloaded: the file is taken from an explicit
  path, else torch.hub.get_dir()/checkpoints/, else cd-fvd's own download location, else MissingWeightsError.
- Statistics: mean and population covariance (ddof 0: sum of outer products / N - mean mean^T, as StyleGAN-V's and
  cd-fvd's `FeatureStats.get_mean_cov`; pytorch-fid and the TF FID code use ddof 1 instead), accumulated in
  float64. FVD = ||mu_r - mu_f||^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2)), in float64.

StyleGAN-V's own scripts load a TorchScript export of the TF-Hub I3D instead of these weights; the feature layer
and statistics are the same, but values can differ from papers that use that file.

Input convention, as the rest of `opensora_vae.metrics`: clips (N, T, C=3, H, W), float in [0, 1] or uint8 in
[0, 255]; any H, W (frames are resized). The pretrained numbers assume real RGB video; FVD of few clips is biased
and noisy (the covariance of 400-d features is singular below 401 clips; papers use 2048 or more).
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from cdfvd.third_party.i3d.pytorch_i3d import InceptionI3d

from opensora_vae.perceptual import MissingWeightsError

__all__ = [
    "FEATURE_DIM",
    "I3D_FILENAME",
    "I3D_URL",
    "FVDAccumulator",
    "FeatureMoments",
    "I3DFeatureExtractor",
    "default_i3d_path",
    "feature_statistics",
    "frechet_distance",
    "get_i3d",
    "load_i3d",
    "rfvd",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

I3D_FILENAME = "i3d_pretrained_400.pt"
I3D_URL = "https://github.com/songweige/TATS/raw/main/tats/fvd/i3d_pretrained_400.pt"  # what cd-fvd downloads
FEATURE_DIM = 400
RESOLUTION = (224, 224)
NUM_FRAMES = 16
MIN_FRAMES = 9


# ----------------------------------------------------------------------------------------------- Frechet distance

def _as_float64(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has NaN or infinite entries")
    return arr


def _psd_sqrt(sym: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix; round-off negative eigenvalues count as 0."""
    w, v = np.linalg.eigh(sym)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 0.0) -> float:
    """Frechet distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians, in float64.

    The trace of the square root is computed as tr((R S2 R)^(1/2)) with R = S1^(1/2), both by symmetric
    eigendecompositions: R S2 R is symmetric PSD with the eigenvalues of S1 S2 (eig(AB) = eig(BA) with A = R,
    B = R S2), so no complex parts appear and singular covariances (fewer samples than dimensions) need no
    inverse. This equals the scipy.linalg.sqrtm(S1 @ S2) route of pytorch-fid / StyleGAN-V / cd-fvd in exact
    arithmetic (tested), without its imaginary round-off. Round-off negative eigenvalues count as 0, the
    inputs are symmetrised first, and a negative total (round-off around 0) is returned as 0.0.

    `eps` > 0 adds eps * I to both covariances (pytorch-fid's fallback for a failing sqrtm); not needed on
    this route and off by default, since it changes the value.
    """
    mu1, mu2 = _as_float64(mu1, "mu1").reshape(-1), _as_float64(mu2, "mu2").reshape(-1)
    s1, s2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"Frechet distance needs means (D,) and covariances (D, D) of one D: got {mu1.shape}, "
            f"{s1.shape}, {mu2.shape}, {s2.shape}"
        )
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    if eps:
        s1, s2 = s1 + eps * np.eye(d), s2 + eps * np.eye(d)
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    return max(value, 0.0)


def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and population covariance (D, D, ddof 0 as StyleGAN-V / cd-fvd) of features (N, D), float64."""
    x = _as_float64(features, "features")
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    _check_count(x.shape[0], x.shape[1])
    mu = x.mean(axis=0)
    centred = x - mu  # two-pass: no cancellation between E[x x^T] and mu mu^T
    return mu, centred.T @ centred / x.shape[0]


def _check_count(n: int, dim: Optional[int]) -> None:
    if n < 2:
        raise ValueError(f"FVD needs at least 2 clips per set to estimate a covariance, got {n}")
    if n <= dim:
        warnings.warn(
            f"FVD from {n} clips is unreliable: the {dim}-d feature covariance is singular below {dim + 1} clips "
            f"(papers use 2048 or more)",
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------------------ I3D extractor

def default_i3d_path() -> Path:
    """torch.hub.get_dir()/checkpoints/i3d_pretrained_400.pt."""
    return Path(torch.hub.get_dir()) / "checkpoints" / I3D_FILENAME


def _cdfvd_download_path() -> Path:
    """Where cd-fvd itself saves the file (next to its pytorch_i3d.py) after an online run."""
    import cdfvd.third_party.i3d as pkg

    return Path(pkg.__file__).parent / I3D_FILENAME


def _missing_message(searched: List[str]) -> str:
    places = "\n".join(f"  - {p}" for p in searched)
    return (
        f"FVD needs cd-fvd's I3D (Kinetics-400) weights '{I3D_FILENAME}' ({I3D_URL}), which cannot be downloaded "
        f"here. Looked at:\n{places}\nCopy the file to {default_i3d_path()} (torch.hub.get_dir()/checkpoints/, or "
        f"set TORCH_HOME), or pass its path explicitly (load_i3d(weights=...))."
    )


def _random_init(net: torch.nn.Module, seed: int) -> None:
    """He-normal conv weights from a private generator. PyTorch's default init shrinks activations through I3D's
    ~60 layers until the logits equal the bias for every input (~1e-8 relative spread), useless even for tests."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)


class I3DFeatureExtractor(torch.nn.Module):
    """Clips (N, T, 3, H, W), float in [0, 1] or uint8 -> (N, 400) float32 I3D logits (module docstring)."""

    feature_dim = FEATURE_DIM

    def __init__(self, net: InceptionI3d, num_frames: Optional[int] = NUM_FRAMES):
        super().__init__()
        if num_frames is not None and num_frames < MIN_FRAMES:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames per clip, got num_frames={num_frames}")
        self.net = net
        self.num_frames = num_frames

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def preprocess(self, clips: torch.Tensor) -> torch.Tensor:
        """(N, T, 3, H, W) -> network input (N, 3, num_frames, 224, 224) float32 in [-1, 1] on the net's device."""
        if clips.ndim != 5 or clips.shape[2] != 3:
            raise ValueError(f"FVD expects RGB clips (N, T, 3, H, W), got shape {tuple(clips.shape)}")
        t = clips.shape[1]
        need = MIN_FRAMES if self.num_frames is None else self.num_frames
        if t < need:
            raise ValueError(f"I3D FVD needs at least {need} frames per clip (num_frames={self.num_frames}), got {t}")
        x = clips[:, : self.num_frames or t].detach().to(self.device)
        # cd-fvd resizes values in [0, 255]: same order of operations, so uint8 input is bit-identical to it
        x = x.float() if x.dtype == torch.uint8 else x.float() * 255.0
        n, t = x.shape[:2]
        x = F.interpolate(x.flatten(0, 1), size=RESOLUTION, mode="bilinear", align_corners=False)
        x = x.view(n, t, 3, *RESOLUTION).transpose(1, 2).contiguous()
        return 2.0 * x / 255.0 - 1

    @torch.no_grad()
    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(clips))


def load_i3d(
    weights: Optional[PathLike] = None,
    random_weights: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    num_frames: Optional[int] = NUM_FRAMES,
    seed: int = 0,
) -> I3DFeatureExtractor:
    """A frozen, eval-mode I3D feature extractor, built without network access.

    Weights from `weights` (a state dict file for cd-fvd's InceptionI3d), else default_i3d_path(), else cd-fvd's
    download location; none there raises MissingWeightsError. `random_weights=True` keeps the same network
    randomly initialised (He-normal, from `seed`): its values are meaningless (tests only).
    """
    net = InceptionI3d(FEATURE_DIM, in_channels=3)
    if random_weights:
        logger.warning("FVD uses a RANDOM I3D: its values are meaningless (tests only)")
        _random_init(net, seed)
    else:
        candidates = ([Path(weights).expanduser()] if weights is not None
                      else [default_i3d_path(), _cdfvd_download_path()])
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            searched = [str(p) for p in candidates]
            raise MissingWeightsError(_missing_message(searched), searched=searched)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict for cd-fvd's InceptionI3d")
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ValueError(f"{path} is not a state dict for cd-fvd's InceptionI3d(400): {first}") from None
    extractor = I3DFeatureExtractor(net, num_frames=num_frames).eval().requires_grad_(False)
    return extractor.to(device) if device is not None else extractor


_MODELS: Dict[Tuple, I3DFeatureExtractor] = {}


def get_i3d(
    weights: Optional[PathLike] = None,
    random_weights: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    num_frames: Optional[int] = NUM_FRAMES,
) -> I3DFeatureExtractor:
    """load_i3d, memoised per (weights, random, device, num_frames) so repeated batches reuse one network."""
    key = (None if weights is None else os.fspath(weights), random_weights, str(torch.device(device or "cpu")),
           num_frames)
    if key not in _MODELS:
        _MODELS[key] = load_i3d(weights, random_weights, device or "cpu", num_frames)
    return _MODELS[key]


# ------------------------------------------------------------------------------------------ streaming statistics

class FeatureMoments:
    """Running count, sum and sum of outer products (float64, CPU) of one set's features.

    Additive, so partial moments merge exactly: `merge` another instance or a gathered `state()` dict, or
    `all_reduce` across ranks (one SUM of the packed state), then `statistics()`. `dim`: the feature dimension;
    None takes it from the first features added (a rank that may see no clips needs it given, for `state` /
    `all_reduce`). Covariance = E[x x^T] - mu mu^T (StyleGAN-V's single-pass form); float64 keeps the
    cancellation small for I3D logits.
    """

    def __init__(self, dim: Optional[int] = FEATURE_DIM):
        self.dim: Optional[int] = None
        self.count = 0
        if dim is not None:
            self._allocate(dim)

    def _allocate(self, dim: int) -> None:
        self.dim = dim
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, features: torch.Tensor) -> None:
        """Add features (N, dim) of N clips (dim=None at construction: taken from the first call)."""
        x = torch.as_tensor(features).detach().to("cpu", torch.float64)
        if self.dim is None and x.ndim == 2:
            self._allocate(x.shape[1])
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features (N, {self.dim}), got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("features have NaN or infinite entries")
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sum_outer += x.T @ x

    def state(self) -> Dict[str, torch.Tensor]:
        """{'count': (), 'sum': (D,), 'sum_outer': (D, D)} float64: sum these over ranks (or gather and add)."""
        if self.dim is None:
            raise ValueError("these moments have no dimension yet: give FeatureMoments(dim) or add features first")
        return {"count": torch.tensor(float(self.count), dtype=torch.float64), "sum": self.sum.clone(),
                "sum_outer": self.sum_outer.clone()}

    @classmethod
    def from_state(cls, state: Dict[str, torch.Tensor]) -> "FeatureMoments":
        return cls(None).merge(state)

    def merge(self, other: Union["FeatureMoments", Dict[str, torch.Tensor]]) -> "FeatureMoments":
        """Add another set of moments (an instance or a `state()` dict) into this one; returns self."""
        s = other.state() if isinstance(other, FeatureMoments) else other
        if self.dim is None:
            self._allocate(int(s["sum"].shape[0]))
        if tuple(s["sum"].shape) != (self.dim,):
            raise ValueError(f"cannot merge moments of dimension {tuple(s['sum'].shape)} into dimension {self.dim}")
        self.count += int(round(float(s["count"])))
        self.sum += s["sum"].detach().to("cpu", torch.float64)
        self.sum_outer += s["sum_outer"].detach().to("cpu", torch.float64)
        return self

    def all_reduce(self, group=None, device: Optional[Union[str, torch.device]] = None) -> "FeatureMoments":
        """Sum the moments of all ranks in place (no-op without an initialised process group); returns self.

        `device`: where the collective runs; default the current CUDA device for NCCL, else CPU.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        if device is None:
            nccl = dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        s = self.state()
        packed = torch.cat([s["count"].view(1), s["sum"], s["sum_outer"].flatten()]).to(device)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        packed = packed.cpu()
        self.count = int(round(packed[0].item()))
        self.sum = packed[1 : 1 + self.dim].clone()
        self.sum_outer = packed[1 + self.dim :].view(self.dim, self.dim).clone()
        return self

    def statistics(self) -> Tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and population covariance (D, D), float64 numpy."""
        _check_count(self.count, self.dim)
        mu = self.sum / self.count
        sigma = self.sum_outer / self.count - torch.outer(mu, mu)
        return mu.numpy(), sigma.numpy()


class FVDAccumulator:
    """Streaming rFVD: feed (real, reconstructed) batches as they come, then `compute()`.

    Distributed: each rank feeds its clips, then `all_reduce()` (or merge the `state()` dicts gathered by the
    caller) before `compute()`; the result does not depend (beyond round-off) on how clips were split over ranks or
    batches.
    """

    def __init__(self, extractor=None, batch_size: int = 8, dim: Optional[int] = None):
        """`extractor`: clips -> (N, D) features (e.g. load_i3d()); `dim` defaults to its `feature_dim`."""
        dim = dim if dim is not None else getattr(extractor, "feature_dim", None)
        self.extractor = extractor
        self.batch_size = batch_size
        self.real = FeatureMoments(dim)
        self.fake = FeatureMoments(dim)

    def _features(self, clips: torch.Tensor) -> torch.Tensor:
        if self.extractor is None:
            raise ValueError("FVDAccumulator was built without an extractor: use add_features")
        return torch.cat([self.extractor(clips[i : i + self.batch_size])
                          for i in range(0, clips.shape[0], self.batch_size)])

    def update(self, real_clips: torch.Tensor, fake_clips: torch.Tensor) -> None:
        """Add a batch of real and reconstructed clips (module docstring's convention), `batch_size` at a time."""
        self.add_features(self._features(real_clips), self._features(fake_clips))

    def add_features(self, real_features: torch.Tensor, fake_features: torch.Tensor) -> None:
        self.real.add(real_features)
        self.fake.add(fake_features)

    def state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        return {"real": self.real.state(), "fake": self.fake.state()}

    def merge(self, state: Dict[str, Dict[str, torch.Tensor]]) -> "FVDAccumulator":
        self.real.merge(state["real"])
        self.fake.merge(state["fake"])
        return self

    def all_reduce(self, group=None, device=None) -> "FVDAccumulator":
        self.real.all_reduce(group, device)
        self.fake.all_reduce(group, device)
        return self

    def compute(self) -> float:
        """FVD between everything added so far."""
        mu_r, s_r = self.real.statistics()
        mu_f, s_f = self.fake.statistics()
        return frechet_distance(mu_r, s_r, mu_f, s_f)


def rfvd(real_clips: torch.Tensor, fake_clips: torch.Tensor, extractor: torch.nn.Module, batch_size: int = 8) -> float:
    """rFVD of two clip sets (N, T, 3, H, W), float in [0, 1] or uint8; features `batch_size` clips at a time.

    `extractor` maps clips to (N, D) features, e.g. load_i3d(...); both sets need at least 2 clips.
    """
    for name, clips in (("real_clips", real_clips), ("fake_clips", fake_clips)):
        if clips.ndim != 5:
            raise ValueError(f"{name} must be clips (N, T, 3, H, W), got shape {tuple(clips.shape)}")
        if clips.shape[0] < 2:
            raise ValueError(f"FVD needs at least 2 clips per set to estimate a covariance, {name} has "
                             f"{clips.shape[0]}")
    acc = FVDAccumulator(extractor, batch_size)
    acc.update(real_clips, fake_clips)
    return acc.compute()
