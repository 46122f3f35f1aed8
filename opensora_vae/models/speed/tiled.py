"""The VAE classes `enable_tiling` swaps in: their per-frame / per-chunk hook runs through `tiling`."""
from ..spatial import VideoAutoencoderKL
from ..temporal import VAE_Temporal
from .tiling import autoencoderkl_decode, autoencoderkl_encode, temporal_tiled


class TiledVideoAutoencoderKL(VideoAutoencoderKL):
    def _encode_frames(self, f, dest):
        y = autoencoderkl_encode(self.module, f, self.tiling)
        return y if dest is None else dest.copy_(y)

    def _decode_frames(self, f, dest):
        # Scaled latents: divided tile by tile, so no whole-frame copy is made.
        return autoencoderkl_decode(self.module, f, self.tiling, out=dest, divisor=self.scaling_factor)


class TiledVAE_Temporal(VAE_Temporal):
    def _run(self, fn, x):
        return temporal_tiled(fn, self, x, self.tiling)


TILED = {VideoAutoencoderKL: TiledVideoAutoencoderKL, VAE_Temporal: TiledVAE_Temporal}
PLAIN = {v: k for k, v in TILED.items()}


def set_tiling(model, cfg) -> None:
    """Each VAE in `model` tiled with `cfg` (a TilingConfig, kept as its `tiling`), or plain again (None)."""
    for m in model.modules():
        plain = PLAIN.get(type(m), type(m))
        if plain in TILED:
            m.__class__ = plain if cfg is None else TILED[plain]
            m.tiling = cfg
