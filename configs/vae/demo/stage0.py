# Demo stage 0 (not in the published recipe): fit the tiny spatial VAE on single frames and photos with the recipe's
# pixel losses (L1 + LPIPS, NLL, KL), the temporal VAE frozen and unused: the stand-in for the pretrained SDXL VAE
# that the real recipe starts from.
_base_ = ["../train/stage3.py", "common.py"]

model = dict(vae_2d={{_base_._demo_vae_2d}}, vae_temporal={{_base_._demo_vae_temporal}})
_image_size = {{_base_._demo_image_size}}
_num_frames = 1
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
mixed_strategy = None
train_spatial_only = True
batch_size = 8
lr = 2e-3
max_steps = 320
lr_schedule = dict(type="cosine", min_ratio=0.05)  # minutes of training end far better annealed
warmup_steps = 15  # Adam at these rates wrecks the random start without it
