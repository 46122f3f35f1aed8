# Demo reconstructions (scripts/inference_vae.py --ckpt-path DEMO_CHECKPOINT): the demo model at the demo size.
_base_ = ["../inference/video.py", "common.py"]

model = dict(from_pretrained=None, vae_2d={{_base_._demo_vae_2d}}, vae_temporal={{_base_._demo_vae_temporal}})
_image_size = {{_base_._demo_image_size}}
_num_frames = {{_base_._demo_num_frames}}
dataset = dict(image_size=_image_size, num_frames=_num_frames)
num_workers = 0
dtype = "fp32"
