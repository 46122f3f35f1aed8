# Demo stage 1: the published stage 1 (spatial VAE frozen; z-rec + identity losses; 20% single frames), demo size.
_base_ = ["../train/stage1.py", "common.py"]

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
lr = 1e-3
max_steps = 292  # the temporal VAE is the pipeline's bottleneck, and its steps are the demo's cheapest
warmup_steps = 10
