# finetune_wan.py on a tiny randomly initialised AutoencoderKLWan (the published 4x8x8 compression, 8 channels wide)
# and small clips: runs on CPU in seconds (tests, docs).
_base_ = ["../train/finetune_wan.py"]

model = dict(_delete_=True, type="diffusers:AutoencoderKLWan",
             config=dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1))
dataset = dict(image_size=(16, 16), num_frames=9)
num_workers = 0
dtype = "fp32"
lr = 1e-3
max_steps = 4
ckpt_every = 2
allow_missing_lpips = True
