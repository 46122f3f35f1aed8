# Stage 1 with tiny widths and small clips: runs on CPU in seconds (tests, demo).
_base_ = ["../train/stage1.py", "widths.py"]

model = dict(vae_2d={{_base_._tiny_vae_2d}}, vae_temporal={{_base_._tiny_vae_temporal}})
dataset = dict(image_size=(32, 32))
num_workers = 0
dtype = "fp32"
grad_checkpoint = False
lr = 1e-3
max_steps = 8
ckpt_every = 4
