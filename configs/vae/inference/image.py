# Reconstruct images (clips of one frame) with the published Open-Sora 1.2 VAE.
_base_ = ["video.py"]

dataset = dict(num_frames=1, image_size=(512, 512))
save_dir = "samples/vae_image"
