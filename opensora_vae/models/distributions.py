"""Diagonal Gaussian posterior over latents laid out (B, 2C, ...) as [mean, logvar] along dim 1."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


class DiagonalGaussianDistribution:
    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        # Same clamp as the reference: keeps exp() finite for untrained encoders.
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def cat(cls, parts: Sequence["DiagonalGaussianDistribution"], dim: int = 2) -> "DiagonalGaussianDistribution":
        """One posterior covering several chunks (e.g. micro-chunks along time)."""
        if len(parts) == 1:
            return parts[0]
        means = torch.cat([p.mean for p in parts], dim=dim)
        logvars = torch.cat([p.logvar for p in parts], dim=dim)
        return cls(torch.cat([means, logvars], dim=1))

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def _reduce_dims(self) -> list:
        return list(range(1, self.mean.ndim))

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> torch.Tensor:
        """KL divergence per batch element, summed over all non-batch dimensions."""
        dims = self._reduce_dims()
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of `sample` per batch element."""
        log2pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(log2pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=self._reduce_dims())
