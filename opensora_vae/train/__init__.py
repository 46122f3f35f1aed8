"""Training: checkpoints, logging and the trainer loop."""
from .trainer import NonFiniteLossError, Trainer

__all__ = ["Trainer", "NonFiniteLossError"]
