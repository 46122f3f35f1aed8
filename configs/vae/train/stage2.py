# Stage 2: everything trains; the temporal VAE still rebuilds the 2D latents.
# Start from stage 1: --ckpt-path OUTPUTS/<run>/epochE-global_stepS
_base_ = ["stage1.py"]

model = dict(freeze_vae_2d=False)
use_image_identity_loss = False
