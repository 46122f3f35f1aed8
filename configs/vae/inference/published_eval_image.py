# The reference's image protocol (its configs/vae/inference/image.py): as published_eval.py, one frame at 256x256.
_base_ = ["published_eval.py"]

dataset = dict(num_frames=1)
save_dir = "samples/vae_image"
