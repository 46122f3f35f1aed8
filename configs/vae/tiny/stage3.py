# Stage 3 with tiny widths and small clips: runs on CPU in seconds (tests, demo).
_base_ = ["../train/stage3.py", "widths.py"]

model = dict(vae_2d={{_base_.tiny_vae_2d}}, vae_temporal={{_base_.tiny_vae_temporal}})
image_size = (32, 32)
dataset = dict(image_size=image_size)
num_workers = 0
dtype = "fp32"
grad_checkpoint = False
lr = 1e-3
epochs = 100
max_steps = 8
ckpt_every = 4
dataset = dict(image_size=image_size, num_frames=21)
# No VGG weights on a bare machine: train without the perceptual term (a warning says so).
allow_missing_lpips = True
