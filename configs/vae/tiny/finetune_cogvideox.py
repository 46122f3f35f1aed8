# finetune_cogvideox.py on a tiny randomly initialised AutoencoderKLCogVideoX (4x8x8 compression, 8 channels wide).
_base_ = ["../train/finetune_cogvideox.py"]

model = dict(_delete_=True, type="diffusers:AutoencoderKLCogVideoX",
             config=dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4))
dataset = dict(image_size=(16, 16), num_frames=9)
num_workers = 0
dtype = "fp32"
grad_checkpoint = False
lr = 1e-3
max_steps = 4
ckpt_every = 2
allow_missing_lpips = True
