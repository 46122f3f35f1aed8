"""The adversarial terms of the Open-Sora 1.2 VAE recipe: generator loss with the adaptive weight, discriminator
loss with the optional LeCAM regulariser and gradient penalty.

`AdversarialLoss`'s constructor arguments are training config keys (flat, like VAELoss's). Its defaults are
the reference trainer's (`cfg.get(key, default)` in scripts/train_vae.py); `lecam_ema_decay` is new (the
reference's LeCamEMA default decay).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Dict, Literal, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

GENERATOR_LOSS_TYPES = ("hinge", "non-saturating")
DISCRIMINATOR_LOSS_TYPES = ("hinge", "vanilla", "non-saturating")
_EPS = 1e-4        # added to the adversarial gradient norm in the adaptive weight
_MAX_WEIGHT = 1e4  # the adaptive weight is clamped to [0, _MAX_WEIGHT]
_EMA_BUFFERS = ("lecam_ema_real", "lecam_ema_fake")


def _fp32(device: torch.device):
    """A region where autocast does not turn the loss arithmetic back into bf16."""
    if device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def _zero(device: torch.device) -> torch.Tensor:
    return torch.zeros((), device=device, dtype=torch.float32)


def _nonneg(name: str, value, optional: bool = False) -> float:
    if value is None and optional:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise ValueError(f"{name} must be a number >= 0{' or None' if optional else ''}, got {value!r}")
    return float(value)


class AdversarialLoss(nn.Module):
    """Generator and discriminator GAN losses of the VAE recipe, with the reference's adaptive generator weight.

    Schedule: nothing adversarial acts before `discriminator_start` (`active(step)` is False): the generator
    term is exactly 0 without any gradient computation, the discriminator terms are exactly 0 (tensors without
    a graph: do not backward them, skip the discriminator step) and the LeCAM EMAs do not move. A
    `discriminator_factor` of 0 turns everything off the same way.

    Generator (`generator_loss`): g = -mean(D(fake)) ("hinge") or mean(softplus(-D(fake))) ("non-saturating");
    the term added to the VAE loss is d_weight * discriminator_factor * g, where d_weight =
    generator_factor * clamp(|dNLL/dW| / (|dg/dW| + 1e-4), 0, 1e4), detached, W the decoder's last layer.

    Discriminator (`discriminator_loss`): discriminator_factor * one of
    "hinge" 0.5 (mean relu(1 - D(real)) + mean relu(1 + D(fake))),
    "vanilla" / "non-saturating" 0.5 (mean softplus(-D(real)) + mean softplus(D(fake))) (the reference writes
    the latter as sigmoid cross-entropy; the values are equal); plus, when their weights are > 0,
    LeCAM: lecam_loss_weight * (relu(mean D(real) - ema_fake)^2 + relu(ema_real - mean D(fake))^2), and
    gradient penalty: gradient_penalty_loss_weight * mean over samples of (|d sum D(real) / d real_input| - 1)^2.

    LeCAM EMAs: buffers `lecam_ema_real` / `lecam_ema_fake` (float32 scalars, start 0, in state_dict and kept
    float32 by `.to()`/`.half()`). The regulariser of a call uses the EMAs as they were BEFORE the call; then, in
    training mode and when active, each moves as ema <- decay * ema + (1 - decay) * mean logits of this call
    (whether or not the LeCAM weight is > 0; the means are this process's, not averaged across ranks).

    Differences from the reference: its trainer never passes the EMAs nor a real input, so LeCAM and the gradient
    penalty never act there (its LeCamEMA class is never instantiated); here they work as described. The reference
    computes the adaptive weight (two autograd.grad calls) and runs the losses at every step, multiplying by 0
    before the start; here nothing is computed before it. All loss arithmetic is float32 whatever the logits'
    dtype.
    """

    def __init__(
        self,
        discriminator_factor: float = 1.0,
        discriminator_start: int = -1,
        generator_factor: float = 0.5,
        generator_loss_type: Literal["hinge", "non-saturating"] = "hinge",
        discriminator_loss_type: Literal["hinge", "vanilla", "non-saturating"] = "hinge",
        lecam_loss_weight: Optional[float] = None,
        lecam_ema_decay: float = 0.999,
        gradient_penalty_loss_weight: Optional[float] = None,
    ):
        super().__init__()
        self.discriminator_factor = _nonneg("discriminator_factor", discriminator_factor)
        if isinstance(discriminator_start, bool) or not isinstance(discriminator_start, int):
            raise ValueError(f"discriminator_start must be an integer step (-1: from the start), "
                             f"got {discriminator_start!r}")
        self.discriminator_start = discriminator_start
        self.generator_factor = _nonneg("generator_factor", generator_factor)
        if generator_loss_type not in GENERATOR_LOSS_TYPES:
            raise ValueError(f"generator_loss_type must be one of {', '.join(map(repr, GENERATOR_LOSS_TYPES))}, "
                             f"got {generator_loss_type!r}")
        if discriminator_loss_type not in DISCRIMINATOR_LOSS_TYPES:
            raise ValueError(f"discriminator_loss_type must be one of "
                             f"{', '.join(map(repr, DISCRIMINATOR_LOSS_TYPES))}, got {discriminator_loss_type!r}")
        self.generator_loss_type = generator_loss_type
        self.discriminator_loss_type = discriminator_loss_type
        self.lecam_loss_weight = _nonneg("lecam_loss_weight", lecam_loss_weight, optional=True)
        if isinstance(lecam_ema_decay, bool) or not isinstance(lecam_ema_decay, (int, float)) \
                or not 0.0 <= lecam_ema_decay <= 1.0:
            raise ValueError(f"lecam_ema_decay must be a number in [0, 1], got {lecam_ema_decay!r}")
        self.lecam_ema_decay = float(lecam_ema_decay)
        self.gradient_penalty_loss_weight = _nonneg("gradient_penalty_loss_weight", gradient_penalty_loss_weight,
                                                    optional=True)
        self.register_buffer("lecam_ema_real", torch.zeros((), dtype=torch.float32))
        self.register_buffer("lecam_ema_fake", torch.zeros((), dtype=torch.float32))

    def extra_repr(self) -> str:
        return (f"discriminator_factor={self.discriminator_factor}, discriminator_start={self.discriminator_start}, "
                f"generator_factor={self.generator_factor}, generator_loss_type={self.generator_loss_type!r}, "
                f"discriminator_loss_type={self.discriminator_loss_type!r}, "
                f"lecam_loss_weight={self.lecam_loss_weight}, lecam_ema_decay={self.lecam_ema_decay}, "
                f"gradient_penalty_loss_weight={self.gradient_penalty_loss_weight}")

    def _apply(self, fn, *args, **kwargs):
        # .to(device) moves the EMAs, but a dtype cast (.to(bf16), .half()) must not round them: keep float32.
        before = {name: self._buffers[name] for name in _EMA_BUFFERS}
        super()._apply(fn, *args, **kwargs)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    # ----- schedule ----------------------------------------------------------------------------------------------
    def active(self, global_step: int) -> bool:
        """Whether the adversarial terms act at `global_step` (0-based index of the step being taken):
        step >= discriminator_start and discriminator_factor > 0."""
        return self.discriminator_factor > 0 and global_step >= self.discriminator_start

    # ----- generator ---------------------------------------------------------------------------------------------
    def _raw_generator_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        x = fake_logits.float()
        if self.generator_loss_type == "hinge":
            return -x.mean()
        return F.softplus(-x).mean()  # non-saturating: cross-entropy of D(fake) against "real"

    def adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """generator_factor * clamp(|d nll/d last_layer| / (|d g_loss/d last_layer| + 1e-4), 0, 1e4), detached,
        float32 (both gradients taken with retain_graph=True, so the graph stays for the backward)."""
        nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        with _fp32(nll_grad.device):
            ratio = torch.linalg.vector_norm(nll_grad.float()) / (torch.linalg.vector_norm(g_grad.float()) + _EPS)
            return ratio.clamp(0.0, _MAX_WEIGHT).detach() * self.generator_factor

    def generator_loss(self, fake_logits: Optional[torch.Tensor], nll_loss: torch.Tensor, last_layer: torch.Tensor,
                       global_step: int) -> Dict[str, torch.Tensor]:
        """The VAE's adversarial term. `fake_logits`: D(reconstruction), with the graph back to the VAE;
        `nll_loss`: the reconstruction NLL the adaptive weight balances against; `last_layer`: the decoder
        weight both gradients are taken at. Returns "adversarial" (add it to the VAE loss), "g_loss" (the raw
        generator loss) and "d_weight" (both detached). Before the start all are 0 and `fake_logits` may be None.
        Outside training (module.eval(), or no graph to differentiate) d_weight is 0, as in the reference."""
        device = nll_loss.device
        if not self.active(global_step):
            return {"adversarial": _zero(device), "g_loss": _zero(device), "d_weight": _zero(device)}
        if fake_logits is None:
            raise ValueError(f"generator_loss needs fake_logits at step {global_step} (active from "
                             f"discriminator_start={self.discriminator_start})")
        with _fp32(fake_logits.device):
            g_loss = self._raw_generator_loss(fake_logits)
            differentiable = torch.is_grad_enabled() and nll_loss.requires_grad and g_loss.requires_grad
            if self.generator_factor == 0:
                d_weight = _zero(device)
            elif differentiable:
                d_weight = self.adaptive_weight(nll_loss, g_loss, last_layer)
            elif self.training:
                raise ValueError("generator_loss in training mode needs nll_loss and fake_logits with a graph back "
                                 "to last_layer (call .eval() for validation without gradients)")
            else:
                d_weight = _zero(device)
            adversarial = d_weight * self.discriminator_factor * g_loss
        return {"adversarial": adversarial, "g_loss": g_loss.detach(), "d_weight": d_weight.detach()}

    # ----- discriminator -----------------------------------------------------------------------------------------
    def _raw_discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        if self.discriminator_loss_type == "hinge":
            return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
        # "vanilla" and "non-saturating": sigmoid cross-entropy, real -> 1, fake -> 0
        return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())

    @staticmethod
    def gradient_penalty(real_input: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
        """mean over samples of (|d sum(real_logits) / d real_input| - 1)^2, the norm per sample (first dim),
        with create_graph=True so that it trains the discriminator."""
        grad = torch.autograd.grad(outputs=real_logits, inputs=real_input, grad_outputs=torch.ones_like(real_logits),
                                   create_graph=True, retain_graph=True)[0]
        with _fp32(grad.device):
            norms = torch.linalg.vector_norm(rearrange(grad.float(), "b ... -> b (...)"), dim=1)
            return ((norms - 1.0) ** 2).mean()

    def discriminator_loss(self, real_logits: Optional[torch.Tensor], fake_logits: Optional[torch.Tensor],
                           global_step: int, real_input: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The discriminator's loss from D(real) and D(fake) (the fake input detached from the VAE).
        Returns "disc_loss", "lecam", "gradient_penalty" (each 0 when off) and "total" (their sum: backward this).
        With gradient_penalty_loss_weight > 0, `real_input` must be the tensor D(real) was computed from, with
        requires_grad set before that forward. Before the start all are 0 (no graph) and logits may be None."""
        if not self.active(global_step):
            like = real_logits if real_logits is not None else fake_logits
            zero = _zero(like.device if like is not None else torch.device("cpu"))
            return {"disc_loss": zero, "lecam": zero.clone(), "gradient_penalty": zero.clone(), "total": zero.clone()}
        if real_logits is None or fake_logits is None:
            raise ValueError(f"discriminator_loss needs real_logits and fake_logits at step {global_step} (active "
                             f"from discriminator_start={self.discriminator_start})")
        device = real_logits.device
        with _fp32(device):
            real, fake = real_logits.float(), fake_logits.float()
            disc_loss = self.discriminator_factor * self._raw_discriminator_loss(real, fake)
            real_mean, fake_mean = real.mean(), fake.mean()
            lecam = _zero(device)
            if self.lecam_loss_weight > 0:
                # the EMAs before this call's update (copies: the update below is in place)
                ema_real = self.lecam_ema_real.to(device, copy=True)
                ema_fake = self.lecam_ema_fake.to(device, copy=True)
                lecam = self.lecam_loss_weight * (F.relu(real_mean - ema_fake) ** 2 + F.relu(ema_real - fake_mean) ** 2)
            penalty = _zero(device)
            if self.gradient_penalty_loss_weight > 0:
                if real_input is None or not real_input.requires_grad:
                    raise ValueError("gradient_penalty_loss_weight > 0 needs real_input: the discriminator's real "
                                     "input with requires_grad set before computing real_logits")
                penalty = self.gradient_penalty_loss_weight * self.gradient_penalty(real_input, real_logits)
            if self.training:
                with torch.no_grad():
                    decay = self.lecam_ema_decay
                    for ema, mean in ((self.lecam_ema_real, real_mean), (self.lecam_ema_fake, fake_mean)):
                        ema.mul_(decay).add_((1.0 - decay) * mean.to(ema.device))
            total = disc_loss + lecam + penalty
        return {"disc_loss": disc_loss, "lecam": lecam, "gradient_penalty": penalty, "total": total}
