# Stage 1: spatial VAE frozen (SDXL VAE weights), temporal VAE learns to rebuild the 2D latents;
# 20% of steps train on single frames with an identity loss pulling the temporal latent to the 2D latent.
# The recipe's shared settings (bf16 autocast, AdamW lr 1e-5, clip 1.0, batch 1 per rank, gradient checkpointing,
# sharded AdamW state, L1/LPIPS 0.1/KL 1e-6 weights, ckpt_every 1000) are the declared defaults:
# opensora_vae/config.py (TrainConfig) and docs/config.md. This file states what differs.
dataset = dict(
    type="VideoTextDataset",
    data_path=None,
    num_frames=17,
    frame_interval=1,
    image_size=(256, 256),
)
num_workers = 4

model = dict(
    type="OpenSoraVAE_V1_2",
    from_pretrained=None,
    micro_frame_size=None,  # one chunk per clip, as the reference configs
    micro_batch_size=4,
    freeze_vae_2d=True,
)

use_z_rec_loss = True
use_image_identity_loss = True
mixed_strategy = "mixed_video_image"
mixed_image_ratio = 0.2
