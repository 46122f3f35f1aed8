"""An exponential moving average of the trainable weights, kept in fp32 whatever the model's dtype."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn


class EMA:
    """After each update: ema = decay * ema + (1 - decay) * weight, for every parameter that requires grad.

    Saved as a whole model (`full_state_dict`: the frozen weights as they are, the trained ones averaged) in the
    published format, so inference and encoding load it like any checkpoint; `state_dict` holds the averages only.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.shadow: Dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    def full_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        state = dict(model.state_dict())
        state.update(self.shadow)
        return state

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"the checkpoint's EMA lacks {len(missing)} trained weight(s), e.g. {sorted(missing)[0]}: "
                           f"it was trained with another `trainable` setting")
        for name, t in self.shadow.items():
            t.copy_(state[name].float())
