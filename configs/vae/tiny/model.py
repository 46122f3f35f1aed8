# The published pipeline (OpenSoraVAE_V1_2: shift, scale, micro-chunks) with tiny widths: for tests and the demo.
_base_ = ["widths.py"]
model = dict(
    type="OpenSoraVAE_V1_2",
    micro_frame_size=17,
    micro_batch_size=4,
    vae_2d={{_base_._tiny_vae_2d}},
    vae_temporal={{_base_._tiny_vae_temporal}},
)
