# Fine-tune the whole CogVideoX VAE (diffusers' AutoencoderKLCogVideoX, shared by CogVideoX-2b/5b) on your own clips
# with the pixel losses: L1 + LPIPS (0.1) as NLL, KL (1e-6). Its latents change; to keep them, fine-tune the decoder
# alone: finetune_cogvideox_decoder.py.
# torchrun --nproc_per_node=8 scripts/train_vae.py configs/vae/train/finetune_cogvideox.py --data-path train.csv
dataset = dict(
    type="VideoTextDataset",
    data_path=None,
    num_frames=17,  # CogVideoX takes 8k+1 frames in diffusers (1, 9, 17, 25, 33, ...)
    frame_interval=1,
    image_size=(256, 256),  # multiples of 8, its spatial compression
)
num_workers = 4

model = dict(type="diffusers:AutoencoderKLCogVideoX", from_pretrained="THUDM/CogVideoX-2b", subfolder="vae")

use_real_rec_loss = True  # the pixel terms: Open-Sora's latent terms do not apply to another model
mixed_strategy = "mixed_video_random"  # clips of 1, 9 or 17 frames: the lengths it takes
grad_checkpoint = True
lr = 1e-5
ema_decay = 0.999
keep_last = 3
