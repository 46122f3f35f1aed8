# Fine-tune the whole Wan 2.1 VAE (diffusers' AutoencoderKLWan, the VAE of Wan 2.1 and of Wan 2.2's 14B models) on
# your own clips with the pixel losses: L1 + LPIPS (0.1) as NLL, KL (1e-6). Its latents change: retrain or fine-tune
# a diffusion model on them. To keep them, fine-tune the decoder alone: finetune_wan_decoder.py.
# torchrun --nproc_per_node=8 scripts/train_vae.py configs/vae/train/finetune_wan.py --data-path train.csv
# Checkpoints: RUN/epochE-global_stepS/model loads with diffusers.AutoencoderKLWan.from_pretrained (docs/any_vae.md).
dataset = dict(
    type="VideoTextDataset",
    data_path=None,
    num_frames=17,  # Wan takes 4k+1 frames (1, 5, 9, 13, 17, ...)
    frame_interval=1,
    image_size=(256, 256),  # multiples of 8, its spatial compression
)
num_workers = 4

model = dict(type="diffusers:AutoencoderKLWan", from_pretrained="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", subfolder="vae")

use_real_rec_loss = True  # the pixel terms: Open-Sora's latent terms do not apply to another model
mixed_strategy = "mixed_video_random"  # clips of 1, 5, 9, 13 or 17 frames: the lengths Wan takes
grad_checkpoint = False  # diffusers' AutoencoderKLWan has no gradient checkpointing
lr = 1e-5
ema_decay = 0.999  # RUN/epochE-global_stepS/ema: the averaged weights, in Wan's own format too
keep_last = 3
