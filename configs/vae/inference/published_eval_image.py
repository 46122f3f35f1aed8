# The reference's image protocol (its configs/vae/inference/image.py): as published_eval.py, one frame at 256x256.
_base_ = ["published_eval.py"]

num_frames = 1
dataset = dict(num_frames=num_frames)
save_dir = "samples/vae_image"
