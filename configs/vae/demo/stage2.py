# Demo stage 2: the published stage 2 (everything trains on the z-rec loss), demo size.
_base_ = ["../train/stage2.py", "common.py"]

model = dict(vae_2d={{_base_._demo_vae_2d}}, vae_temporal={{_base_._demo_vae_temporal}})
_image_size = {{_base_._demo_image_size}}
_num_frames = {{_base_._demo_num_frames}}
dataset = dict(crop="random", image_size=_image_size, num_frames=_num_frames,
               permute_channels={{_base_._demo_permute_channels}})
# Random crops: the cached frames keep their aspect ratio (64 x W). CPU, no downloads: fp32, data read in the
# training process (the cache is small), LPIPS without VGG weights allowed.
num_workers = 0
dtype = "fp32"
grad_checkpoint = False
allow_missing_lpips = True
trackers = []
epochs = 100000
ckpt_every = 0
lr = 1e-5  # the published rate: a faster one lets the z-rec loss wear down the spatial encoder
max_steps = 10  # at the published lr (1e-5) it changes little; it runs to show the stage works
