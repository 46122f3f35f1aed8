# Tiny widths with the published structure (the reference fixture's), shared by the tiny configs.
_tiny_vae_2d = dict(
    type="VideoAutoencoderKL",
    from_pretrained=None,
    config=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        block_out_channels=[16, 32],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ),
)
_tiny_vae_temporal = dict(
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
