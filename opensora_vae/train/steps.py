"""What one training step runs as modules: the VAE's pass with its losses (`TrainStep`) and the discriminator's
(`DiscriminatorStep`), each wrapped in its own DDP by the trainer."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from einops import rearrange
from torch import nn

from ..adversarial import AdversarialLoss
from ..models.discriminator import NLayerDiscriminator


def frames_for(discriminator: nn.Module, video: torch.Tensor) -> torch.Tensor:
    """A clip as the discriminator takes it: the 2D PatchGAN sees its frames as a batch, (b t) c h w, as the
    reference does; the 3D ones the clip."""
    return rearrange(video, "b c t h w -> (b t) c h w") if isinstance(discriminator, NLayerDiscriminator) else video


class TrainStep(nn.Module):
    """Model + loss in one module, so DDP also averages logvar's gradient when it is learned. The model is a
    `VideoAutoencoder` (models/autoencoders.py): any family runs the same pass; the loss reads the model's own
    output where it has one (the Open-Sora pipeline's, for its latent terms). With a discriminator, the adversarial
    term joins the loss, its adaptive weight taken at the model's `last_decoder_weight()`; the discriminator and
    AdversarialLoss stay outside this module (their own DDP and optimizer), its weights frozen while the VAE's graph
    is built."""

    def __init__(self, model: nn.Module, loss: nn.Module, sample_posterior: bool = True, spatial_only: bool = False,
                 discriminator: Optional[nn.Module] = None, adversarial: Optional[AdversarialLoss] = None):
        super().__init__()
        self.model, self.loss = model, loss
        self.sample_posterior = sample_posterior
        self.spatial_only = spatial_only  # the Open-Sora pipeline's spatial VAE alone
        object.__setattr__(self, "discriminator", discriminator)  # not a submodule: not in this DDP
        object.__setattr__(self, "adversarial", adversarial)

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None, global_step: int = 0):
        """(loss terms, the detached reconstruction when the adversarial terms act at this step, else None)."""
        adversarial = self.adversarial is not None and self.adversarial.active(global_step)
        if self.spatial_only:
            out = self.model.model.forward_spatial(x, sample_posterior=self.sample_posterior, generator=generator)
            x_rec = out.x_rec
        else:
            out = self.model(x, sample_posterior=self.sample_posterior, generator=generator,
                             decode_pixels=self.loss.use_real_rec_loss or adversarial)
            x_rec = out.reconstruction
        terms = self.loss(x, out)
        if not adversarial:
            return terms, None
        # The NLL the adaptive weight balances: the pixel one with its perceptual term, as the reference.
        nll = terms["rec_nll"] if "rec_nll" in terms else self.loss.nll(x, x_rec, perceptual=True)
        fake_logits = self.discriminator(frames_for(self.discriminator, x_rec))
        gen = self.adversarial.generator_loss(fake_logits, nll, self.model.last_decoder_weight(), global_step)
        terms.update(g_loss=gen["g_loss"], d_weight=gen["d_weight"], adversarial=gen["adversarial"].detach(),
                     loss=terms["loss"] + gen["adversarial"])
        return terms, x_rec.detach()


class DiscriminatorStep(nn.Module):
    """D(real) and D(fake) as two calls (BatchNorm sees each alone, as in the reference) and the discriminator's
    loss, in one module so that DDP sees one forward per backward."""

    def __init__(self, discriminator: nn.Module, adversarial: AdversarialLoss):
        super().__init__()
        self.discriminator = discriminator
        object.__setattr__(self, "adversarial", adversarial)

    def forward(self, real: torch.Tensor, fake: torch.Tensor, global_step: int) -> Dict[str, torch.Tensor]:
        real, fake = frames_for(self.discriminator, real), frames_for(self.discriminator, fake)
        penalty = bool(self.adversarial.gradient_penalty_loss_weight)
        if penalty:
            real = real.detach().requires_grad_(True)
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake)
        return self.adversarial.discriminator_loss(real_logits, fake_logits, global_step,
                                                   real_input=real if penalty else None)
