"""opensora-vae: train, run and evaluate the Open-Sora 1.2 video VAE."""
from .registry import DATASETS, MODELS, build_model

__version__ = "0.1.0"
__all__ = ["MODELS", "DATASETS", "build_model", "from_pretrained", "__version__"]


def from_pretrained(path_or_id, **kwargs):
    """`VideoAutoencoderPipeline.from_pretrained` (the one loader), imported on first use."""
    from .models import VideoAutoencoderPipeline

    return VideoAutoencoderPipeline.from_pretrained(path_or_id, **kwargs)
