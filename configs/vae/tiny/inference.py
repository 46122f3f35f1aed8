# Inference with the tiny pipeline (tests, demo): published-format checkpoints of it load through --ckpt-path.
_base_ = ["../inference/video.py", "widths.py"]

model = dict(from_pretrained=None, vae_2d={{_base_.tiny_vae_2d}}, vae_temporal={{_base_.tiny_vae_temporal}})
image_size = (64, 64)
dataset = dict(image_size=image_size)
num_workers = 0
dtype = "fp32"
