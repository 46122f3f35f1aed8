# Demo reconstructions (scripts/inference_vae.py --ckpt-path DEMO_CHECKPOINT): the demo model at the demo size.
_base_ = ["../inference/video.py", "common.py"]

model = dict(from_pretrained=None, vae_2d={{_base_.demo_vae_2d}}, vae_temporal={{_base_.demo_vae_temporal}})
image_size = {{_base_.demo_image_size}}
num_frames = {{_base_.demo_num_frames}}
dataset = dict(image_size=image_size, num_frames=num_frames)
num_workers = 0
dtype = "fp32"
