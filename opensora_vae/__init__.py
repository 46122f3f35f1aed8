"""opensora-vae: train, run and evaluate the Open-Sora 1.2 video VAE, and fine-tune, encode with and evaluate any
video autoencoder (diffusers' Wan, CogVideoX, LTX-Video, HunyuanVideo, ...) through one interface."""
from .models import VideoAutoencoderPipeline
from .models.build import build_autoencoder, build_model, load_autoencoder
from .registry import DATASETS, MODELS

__version__ = "0.1.0"
__all__ = ["MODELS", "DATASETS", "build_autoencoder", "build_model", "from_pretrained", "load_autoencoder",
           "__version__"]


def from_pretrained(path_or_id, **kwargs):
    """`VideoAutoencoderPipeline.from_pretrained` (the one loader of this project's own format)."""
    return VideoAutoencoderPipeline.from_pretrained(path_or_id, **kwargs)
