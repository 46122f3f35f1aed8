# Inference with the tiny pipeline (tests, demo): published-format checkpoints of it load through --ckpt-path.
_base_ = ["../inference/video.py", "widths.py"]

model = dict(from_pretrained=None, vae_2d={{_base_._tiny_vae_2d}}, vae_temporal={{_base_._tiny_vae_temporal}})
dataset = dict(image_size=(64, 64))
num_workers = 0
dtype = "fp32"
