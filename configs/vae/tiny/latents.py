# Encoding with the tiny pipeline (tests): tiny shards so a run writes several.
_base_ = ["../inference/latents.py", "widths.py"]

model = dict(from_pretrained=None, vae_2d={{_base_._tiny_vae_2d}}, vae_temporal={{_base_._tiny_vae_temporal}})
buckets = [(5, 32, 32)]
shard_size_mb = 0.004
num_workers = 0
dtype = "fp32"
