"""opensora-vae: train, run and evaluate the Open-Sora 1.2 video VAE."""
from .registry import DATASETS, MODELS, build_model

__version__ = "0.1.0"
__all__ = ["MODELS", "DATASETS", "build_model", "__version__"]
