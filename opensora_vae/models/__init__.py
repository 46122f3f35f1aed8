"""Models, registered in `opensora_vae.registry.MODELS` under the published type names, and the one video-autoencoder
interface every job uses (`VideoAutoencoder`, autoencoders.py; built from a config entry or spec string, build.py)."""
from .autoencoders import AutoencoderOutput, FrameRule, VideoAutoencoder
from .build import as_autoencoder, build_autoencoder, build_model, load_autoencoder, parse_vae_spec
from .discriminator import DISCRIMINATOR_3D, N_Layer_DISCRIMINATOR_3D, NLayerDiscriminator
from .distributions import DiagonalGaussianDistribution
from .pipeline import OpenSoraVAE_V1_2, PipelineOutput, VideoAutoencoderPipeline
from .spatial import VideoAutoencoderKL, sdxl_vae_config
from .temporal import VAE_Temporal, VAE_Temporal_SD

__all__ = [
    "AutoencoderOutput", "DiagonalGaussianDistribution", "DISCRIMINATOR_3D", "FrameRule", "N_Layer_DISCRIMINATOR_3D",
    "NLayerDiscriminator", "OpenSoraVAE_V1_2", "PipelineOutput", "VideoAutoencoder", "VideoAutoencoderKL",
    "VideoAutoencoderPipeline", "VAE_Temporal", "VAE_Temporal_SD", "as_autoencoder", "build_autoencoder",
    "build_model", "load_autoencoder", "parse_vae_spec", "sdxl_vae_config",
]
