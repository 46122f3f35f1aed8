# Encode a CSV once to latent shards for diffusion training (scripts/encode_latents.py), published VAE.
_base_ = ["video.py"]

# Every row is encoded at each (num_frames, height, width) bucket; images are 1-frame clips at each (height,
# width). --num-frames / --image-size replace those fields in every bucket.
buckets = [(17, 256, 256)]
save_dir = "latents/vae"
shard_size_mb = 256  # a shard is written once its latents reach this size; a kill loses at most one per rank
save_dtype = "fp32"  # storage of mean/std: fp32, or bf16 / fp16 for half the bytes
num_workers = 2
