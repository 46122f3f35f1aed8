"""VAE training losses of the Open-Sora 1.2 recipe.

Per frame: rec = |x - x_rec| (+ w_p * LPIPS(x, x_rec), broadcast over the frame's pixels as in the reference),
NLL = rec / exp(logvar) + logvar summed over everything and divided by the number of frames (B*T), with `logvar`
a scalar: fixed at `logvar_init` as in the reference trainer (whose optimizer never sees it), or trained with
`learn_logvar=True`. KL of the posterior is summed, divided by the batch size and weighted by `kl_loss_weight`.
"""
from __future__ import annotations

import inspect

import logging
from contextlib import nullcontext
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from einops import rearrange
from torch import nn

from .models.distributions import DiagonalGaussianDistribution
from .perceptual import MissingWeightsError, build_lpips, lpips_distance

logger = logging.getLogger(__name__)

_OUT_FIELDS = ("x_rec", "x_z_rec", "z", "posterior", "x_z")


def _fp32_region(device: torch.device):
    # Loss terms must not inherit bf16 autocast from the model's forward.
    if device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()  # no autocast exists there (e.g. meta tensors)


def _check_pair(target: torch.Tensor, recon: torch.Tensor, what: str) -> None:
    if target.shape != recon.shape:
        raise ValueError(f"{what}: target shape {tuple(target.shape)} != reconstruction shape {tuple(recon.shape)}")
    if target.ndim != 5:
        raise ValueError(f"{what}: expected 5-D (B, C, T, H, W) tensors, got shape {tuple(target.shape)}")


def _unpack(out: Any) -> Tuple[Any, ...]:
    """The model's training output, as a NamedTuple (by field name) or a plain 5-tuple in the same order; a
    `VideoAutoencoder`'s `AutoencoderOutput` by its model's own output where it has one (the Open-Sora pipeline's,
    for the latent terms), else as pixels and posterior only (no x_z, x_z_rec: the pixel terms and the KL)."""
    if hasattr(out, "native") and hasattr(out, "reconstruction"):
        if out.native is not None:
            return _unpack(out.native)
        return out.reconstruction, None, out.z, out.posterior, None
    if all(hasattr(out, f) for f in _OUT_FIELDS):
        return tuple(getattr(out, f) for f in _OUT_FIELDS)
    if isinstance(out, (tuple, list)) and len(out) == 5:
        return tuple(out)
    raise TypeError(f"expected the model's training output {_OUT_FIELDS}, got {type(out).__name__}")


class VAELoss(nn.Module):
    """NLL (+ LPIPS) reconstruction terms and the weighted KL, with a scalar `logvar` (fixed unless `learn_logvar`).

    The stage switches pick which terms enter the total, as the reference trainer does:
    `use_real_rec_loss` adds the pixel NLL (with LPIPS) and the KL; `use_z_rec_loss` adds the temporal VAE's
    latent NLL; `use_image_identity_loss` adds NLL(x_z, z) on single-frame clips.
    Only `logvar` is a parameter / state_dict entry; LPIPS is frozen and kept out of the module tree.
    """

    def __init__(
        self,
        perceptual_loss_weight: Optional[float] = 0.1,
        kl_loss_weight: Optional[float] = 1e-6,
        logvar_init: float = 0.0,
        learn_logvar: bool = False,
        lpips_net: str = "vgg",
        lpips_backbone_path: Optional[str] = None,
        allow_missing_lpips: bool = False,
        lpips_random_backbone: bool = False,
        use_real_rec_loss: bool = False,
        use_z_rec_loss: bool = False,
        use_image_identity_loss: bool = False,
    ):
        super().__init__()
        # None means "off", as in the reference configs.
        self.perceptual_loss_weight = float(perceptual_loss_weight or 0.0)
        self.kl_loss_weight = float(kl_loss_weight or 0.0)
        if self.perceptual_loss_weight < 0 or self.kl_loss_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got perceptual_loss_weight={perceptual_loss_weight}, "
                f"kl_loss_weight={kl_loss_weight}"
            )
        # A parameter either way, so checkpoints keep one layout; frozen unless learned.
        self.learn_logvar = bool(learn_logvar)
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init), dtype=torch.float32),
                                   requires_grad=self.learn_logvar)
        self.lpips_net = lpips_net
        self.lpips_backbone_path = lpips_backbone_path
        self.allow_missing_lpips = bool(allow_missing_lpips)
        self.lpips_random_backbone = bool(lpips_random_backbone)
        self.use_real_rec_loss = bool(use_real_rec_loss)
        self.use_z_rec_loss = bool(use_z_rec_loss)
        self.use_image_identity_loss = bool(use_image_identity_loss)
        # object.__setattr__ keeps LPIPS out of parameters(), state_dict() and .to(): it is frozen and external.
        object.__setattr__(self, "_lpips", None)
        if self.use_real_rec_loss and self.perceptual_loss_weight > 0:
            self._lpips_model(torch.device("cpu"))  # fail at construction, not at the first training step

    def extra_repr(self) -> str:
        return (
            f"perceptual_loss_weight={self.perceptual_loss_weight}, kl_loss_weight={self.kl_loss_weight}, "
            f"learn_logvar={self.learn_logvar}, "
            f"lpips_net={self.lpips_net!r}, use_real_rec_loss={self.use_real_rec_loss}, "
            f"use_z_rec_loss={self.use_z_rec_loss}, use_image_identity_loss={self.use_image_identity_loss}"
        )

    def _lpips_model(self, device: torch.device):
        """The LPIPS model on `device`, built on first use; None if weights are missing and that is allowed."""
        if self._lpips is None:
            try:
                model = build_lpips(
                    self.lpips_net,
                    backbone_path=self.lpips_backbone_path,
                    random_backbone=self.lpips_random_backbone,
                )
            except MissingWeightsError as err:
                if not self.allow_missing_lpips:
                    raise
                logger.warning("perceptual loss DISABLED (weight set to 0): %s", err)
                self.perceptual_loss_weight = 0.0
                return None
            object.__setattr__(self, "_lpips", model)
        if self._lpips.scaling_layer.shift.device != device:
            self._lpips.to(device)
        return self._lpips

    def _nll(
        self, target: torch.Tensor, recon: torch.Tensor, perceptual: bool, what: str = "nll"
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        _check_pair(target, recon, what)
        b, c, t, h, w = target.shape
        use_lpips = perceptual and self.perceptual_loss_weight > 0
        if use_lpips and c != 3:
            raise ValueError(f"{what}: the perceptual term needs 3-channel pixels, got shape {tuple(target.shape)}")
        with _fp32_region(target.device):
            x, y = target.float(), recon.float()
            logvar = self.logvar.float()
            rec_sum = (x - y).abs().sum()
            lp = None
            model = self._lpips_model(target.device) if use_lpips else None
            if model is not None:
                lp = lpips_distance(
                    model, rearrange(x, "b c t h w -> (b t) c h w"), rearrange(y, "b c t h w -> (b t) c h w")
                )
                # The reference adds the per-frame LPIPS to every pixel of the frame before summing.
                rec_sum = rec_sum + self.perceptual_loss_weight * lp.sum() * (c * h * w)
            # Closed form of sum(rec / exp(logvar) + logvar) over all elements.
            nll = (rec_sum * torch.exp(-logvar) + logvar * x.numel()) / (b * t)
        return nll, (lp.mean() if lp is not None else None)

    def nll(self, target: torch.Tensor, recon: torch.Tensor, perceptual: bool = False) -> torch.Tensor:
        """Scalar NLL of `recon` against `target`, both (B, C, T, H, W), normalised by the B*T frames."""
        return self._nll(target, recon, perceptual)[0]

    def kl(self, posterior: DiagonalGaussianDistribution) -> torch.Tensor:
        """Scalar KL(posterior || N(0, I)) summed, divided by the batch size, times `kl_loss_weight`."""
        device = posterior.mean.device
        if self.kl_loss_weight == 0:
            return torch.zeros((), device=device, dtype=torch.float32)
        with _fp32_region(device):
            if posterior.mean.dtype != torch.float32:
                posterior = DiagonalGaussianDistribution(
                    torch.cat([posterior.mean.float(), posterior.logvar.float()], dim=1))
            kl = posterior.kl().float()
            return kl.sum() / kl.shape[0] * self.kl_loss_weight

    def forward(self, batch_video: torch.Tensor, out: Any) -> Dict[str, torch.Tensor]:
        """All terms by name plus "loss" (the total); `l1`, `lpips` and `logvar` are detached diagnostics."""
        if not (self.use_real_rec_loss or self.use_z_rec_loss or self.use_image_identity_loss):
            raise ValueError("no loss term enabled: set use_real_rec_loss, use_z_rec_loss or use_image_identity_loss")
        x_rec, x_z_rec, z, posterior, x_z = _unpack(out)
        if batch_video.ndim != 5:
            raise ValueError(f"batch_video must be 5-D (B, C, T, H, W), got shape {tuple(batch_video.shape)}")
        terms: Dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=batch_video.device, dtype=torch.float32)

        if self.use_real_rec_loss:
            if x_rec is None:
                raise ValueError("use_real_rec_loss needs the model output x_rec, got None")
            terms["rec_nll"], lp = self._nll(batch_video, x_rec, perceptual=True, what="rec_nll")
            if lp is not None:
                terms["lpips"] = lp.detach()
            total = total + terms["rec_nll"]
        if self.use_z_rec_loss:
            if x_z is None or x_z_rec is None:
                raise ValueError("use_z_rec_loss needs the model outputs x_z and x_z_rec, got None")
            terms["z_rec_nll"], _ = self._nll(x_z, x_z_rec, perceptual=False, what="z_rec_nll")
            total = total + terms["z_rec_nll"]
        if self.use_image_identity_loss and batch_video.shape[2] == 1:
            if x_z is None or z is None:
                raise ValueError("use_image_identity_loss needs the model outputs x_z and z, got None")
            terms["identity_nll"], _ = self._nll(x_z, z, perceptual=False, what="identity_nll")
            total = total + terms["identity_nll"]

        terms["kl"] = self.kl(posterior)
        # The reference trainer adds the KL only together with the pixel reconstruction term.
        if self.use_real_rec_loss:
            total = total + terms["kl"]

        if x_rec is not None:
            with torch.no_grad():
                terms["l1"] = (batch_video.float() - x_rec.float()).abs().mean()
        terms["logvar"] = self.logvar.detach().float()
        terms["loss"] = total
        return terms


def build_loss(cfg: Mapping[str, Any], cls: type = VAELoss) -> nn.Module:
    """A loss from a (flat) training config: its keys are the loss class's arguments (declared there, checked by
    config.check_config; VAELoss, or AdversarialLoss); other keys are other components'."""
    if not hasattr(cfg, "get"):
        raise TypeError(f"build_loss expects a mapping / mmengine Config, got {type(cfg).__name__}")
    names = [n for n in inspect.signature(cls).parameters if n != "self"]
    return cls(**{k: cfg[k] for k in names if k in cfg})
