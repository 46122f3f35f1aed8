"""The VAE classes `enable_tiling` swaps in: a plain VAE class with its per-frame / per-chunk hook run through
`tiling`. Made from the plain class (by its `vae_part`), so the fast path needs no import of the model files."""
from __future__ import annotations

from typing import Dict

from .tiling import autoencoderkl_decode, autoencoderkl_encode, temporal_tiled


class TiledSpatial:
    """Mixed in before a spatial VAE class (VideoAutoencoderKL)."""

    def _encode_frames(self, f, dest):
        y = autoencoderkl_encode(self.module, f, self.tiling)
        return y if dest is None else dest.copy_(y)

    def _decode_frames(self, f, dest):
        # Scaled latents: divided tile by tile, so no whole-frame copy is made.
        return autoencoderkl_decode(self.module, f, self.tiling, out=dest, divisor=self.scaling_factor)


class TiledTemporal:
    """Mixed in before a temporal VAE class (VAE_Temporal)."""

    def _run(self, fn, x):
        return temporal_tiled(fn, self, x, self.tiling)


_MIXINS = {"spatial": TiledSpatial, "temporal": TiledTemporal}
_TILED: Dict[type, type] = {}  # plain class -> its tiled class


def tiled_class(plain: type) -> type:
    """`Tiled<plain>`, made once; a module attribute here, so a tiled model pickles as the plain classes do."""
    if plain not in _TILED:
        name = f"Tiled{plain.__name__}"
        cls = type(name, (_MIXINS[plain.vae_part], plain), {"__module__": __name__, "__qualname__": name,
                                                            "_plain_class": plain})
        _TILED[plain] = globals()[name] = cls
    return _TILED[plain]


def set_tiling(model, cfg) -> None:
    """Each VAE in `model` tiled with `cfg` (a TilingConfig, kept as its `tiling`), or plain again (None)."""
    for m in model.modules():
        if getattr(m, "vae_part", None) in _MIXINS:
            plain = getattr(type(m), "_plain_class", type(m))
            m.__class__ = plain if cfg is None else tiled_class(plain)
            m.tiling = cfg
