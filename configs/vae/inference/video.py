# Reconstruct videos with the published Open-Sora 1.2 VAE (scripts/inference_vae.py). Keys: docs/config.md.
# Deterministic defaults (repeatable scores): posterior means, H.264 CRF 18, every row; the published table used
# published_eval.py (sampled posteriors, CRF 23, 24 fps, 100 rows).
dataset = dict(
    type="VideoTextDataset",
    data_path=None,
    num_frames=17,
    frame_interval=1,
    image_size=(256, 256),
)
num_workers = 2

model = dict(
    type="OpenSoraVAE_V1_2",
    from_pretrained="hpcai-tech/OpenSora-VAE-v1.2",
    micro_frame_size=17,
    micro_batch_size=4,
    # Runtime options (docs/speed.md): compile, winograd, subpixel, tiling (e.g. dict(tile_size=512)).
)
save_dir = "samples/vae_video"
