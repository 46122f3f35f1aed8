# Demo stage 3: the published stage 3 (pixel losses on clips of random length up to 33 frames, micro-chunks of 17),
# demo size. Without VGG weights the perceptual term is off (a warning says so).
_base_ = ["../train/stage3.py", "common.py"]

model = dict(vae_2d={{_base_._demo_vae_2d}}, vae_temporal={{_base_._demo_vae_temporal}})
_image_size = {{_base_._demo_image_size}}
dataset = dict(crop="random", image_size=_image_size,
               permute_channels={{_base_._demo_permute_channels}})  # clips of up to 33 frames, as published
# Random crops: the cached frames keep their aspect ratio (64 x W). CPU, no downloads: fp32, data read in the
# training process (the cache is small), LPIPS without VGG weights allowed.
num_workers = 0
dtype = "fp32"
grad_checkpoint = False
allow_missing_lpips = True
trackers = []
epochs = 100000
ckpt_every = 0
lr = 1e-4  # stage 2 ends near the spatial VAE's score: a gentle rate keeps it (1e-3 undid it)
max_steps = 51  # its time went to stage 1
warmup_steps = 8
lr_schedule = dict(type="cosine", min_ratio=0.05)  # minutes of training end far better annealed
