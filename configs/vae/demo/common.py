# `make demo` (python -m opensora_vae.demo): what every demo stage shares (names only; each stage assigns them).
# A tiny spatial VAE that compresses 4x per side (16-32-64 channels) and a tiny temporal VAE, on 64x64 frames;
# the demo caches its clips at this size once.
demo_image_size = (64, 64)
demo_num_frames = 17
demo_vae_2d = dict(
    type="VideoAutoencoderKL",
    from_pretrained=None,
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
demo_vae_temporal = dict(
    type="VAE_Temporal",
    in_out_channels=4,
    latent_embed_dim=4,
    embed_dim=4,
    filters=16,
    num_res_blocks=1,
    channel_multipliers=(1, 2, 2, 4),
    temporal_downsample=(False, True, True),
    num_groups=4,
)
