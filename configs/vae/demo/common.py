# `make demo` (python -m opensora_vae.demo): what every demo stage shares (names only; each stage assigns them).
# A tiny spatial VAE that compresses 4x per side (16-32-64 channels) and a tiny temporal VAE, on 64x64 frames;
# the demo caches its clips at this size once.
_base_ = ["../tiny/widths.py"]

_demo_image_size = (64, 64)
_demo_num_frames = 17
_demo_vae_2d = dict(
    type="VideoAutoencoderKL",
    from_pretrained=None,
    micro_batch_size=None,  # all frames in one call: a tiny model needs no memory bound (faster steps)
    config=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[16, 32, 64],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    ),
)
# The tiny configs' temporal VAE (filters 16, one res block, 4 groups).
_demo_vae_temporal = {{_base_._tiny_vae_temporal}}
# Every demo stage shuffles the colour channels of half its samples (VideoTextDataset.permute_channels): two training
# scenes and eight photos otherwise teach the tiny model their colour casts (measured: a yellow held-out face).
_demo_permute_channels = 0.5
