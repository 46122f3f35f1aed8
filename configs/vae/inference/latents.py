# Encode a CSV once to latent shards for diffusion training (scripts/encode_latents.py), published VAE.
_base_ = ["video.py"]

# Every row is encoded at each (num_frames, height, width) bucket; images are 1-frame clips at each (height,
# width). --num-frames / --image-size replace those fields in every bucket. save_dtype="bf16" halves the bytes.
buckets = [(17, 256, 256)]
save_dir = "latents/vae"
