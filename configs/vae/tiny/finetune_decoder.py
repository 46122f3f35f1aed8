# Decoder fine-tuning with tiny widths and a small discriminator: runs on CPU in seconds (tests).
_base_ = ["../train/finetune_decoder.py", "widths.py"]

model = dict(from_pretrained=None, vae_2d={{_base_._tiny_vae_2d}}, vae_temporal={{_base_._tiny_vae_temporal}})
dataset = dict(image_size=(32, 32), num_frames=9)
discriminator = dict(ndf=8, n_layers=2)
num_workers = 0
dtype = "fp32"
grad_checkpoint = False
lr = 1e-3
max_steps = 4
ckpt_every = 2
allow_missing_lpips = True
