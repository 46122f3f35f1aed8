"""Models, registered in `opensora_vae.registry.MODELS` under the published type names."""
from .discriminator import DISCRIMINATOR_3D, N_Layer_DISCRIMINATOR_3D, NLayerDiscriminator
from .distributions import DiagonalGaussianDistribution
from .pipeline import OpenSoraVAE_V1_2, PipelineOutput, VideoAutoencoderPipeline
from .spatial import VideoAutoencoderKL, sdxl_vae_config
from .temporal import VAE_Temporal, VAE_Temporal_SD

__all__ = [
    "DiagonalGaussianDistribution", "OpenSoraVAE_V1_2", "PipelineOutput", "VideoAutoencoderPipeline",
    "VideoAutoencoderKL", "sdxl_vae_config", "VAE_Temporal", "VAE_Temporal_SD",
]
