"""The VAE classes `enable_tiling` swaps in: a plain VAE class whose per-frame / per-chunk network calls run tiled.
Made from the plain class (by its `vae_part`), so the fast path needs no import of the model files.

Each call is planned once per input shape (`executor.make_plan`, from `TilingConfig.max_memory`): the exact path
(`executor`), or the low-memory one (`tiling`). A frame whose largest layer fits one tile runs the plain path."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Dict, Optional

import torch
import torch.distributed as dist

from ...errors import UserError
from . import executor, tiling

logger = logging.getLogger(__name__)


def _inference_only() -> None:
    if torch.is_grad_enabled():
        raise UserError("tiling is for inference (encode/decode under torch.no_grad()); gradients through tiles "
                        "are not supported: turn it off for training (model.tiling=False / disable_tiling())")


class _Tiled:
    tiling: Optional[tiling.TilingConfig] = None

    def _tile(self) -> int:
        return self.tiling.tile_size

    def _plan(self, key, program, largest: int, *args, **kwargs) -> executor.Plan:
        """The plan of program(executor, *args, **kwargs), made once per `key`; `largest`: the biggest layer's
        H/W side (a frame that fits one tile runs the plain path)."""
        cfg, tile = self.tiling, self._tile()
        if cfg.recompute:
            return executor.Plan("recompute", cfg.tile_size)
        if largest <= tile and cfg.max_memory is None and not cfg.parallel:
            return executor.Plan("plain", tile)
        plans: Dict = self.__dict__.setdefault("_tiling_plans", {})
        key = (key, cfg)
        if key not in plans:
            device, group = args[1].device, self._group()
            budget = cfg.max_memory
            if budget == "auto":
                budget = executor.available_memory(device)
                if group is not None:  # every rank must make the same plan
                    least = torch.tensor(budget, device=device)
                    dist.all_reduce(least, dist.ReduceOp.MIN, group=group)
                    budget = int(least)
            plans[key] = plan = executor.make_plan(budget, tile, program, *args, device=device, group=group,
                                                   **kwargs)
            if cfg.max_memory == "auto":
                logger.info("tiling: max_memory=auto is %d MiB on %s for a %s input: %s", budget >> 20, device,
                            tuple(args[1].shape), plan)
            if plan.path == "recompute":
                logger.warning("tiling: max_memory=%d bytes cannot hold the stored segments of a %s input: tiles of "
                               "%d recomputed per GroupNorm (bounded memory, close to untiled but not exact%s)",
                               budget, tuple(args[1].shape), plan.tile,
                               "; every rank runs the whole frame" if group is not None else "")
        return plans[key]

    def _group(self):
        """The ranks that split each frame: the default process group's (one process: none to split)."""
        if not self.tiling.parallel or not (dist.is_available() and dist.is_initialized()):
            return None
        return dist.group.WORLD


class TiledSpatial(_Tiled):
    """Mixed in before a spatial VAE class (VideoAutoencoderKL)."""

    def _encode_frames(self, f, dest):
        _inference_only()
        plan = self._plan(("encode", f.shape, f.dtype, f.device), executor.autoencoderkl_encode, max(f.shape[-2:]),
                          self.module, f, out=dest)
        if plan.path == "plain":
            return super()._encode_frames(f, dest)
        if plan.path == "recompute":
            y = tiling.autoencoderkl_encode(self.module, f, _recompute_config(self.tiling, plan.tile))
            return y if dest is None else dest.copy_(y)
        return executor.run_program(executor.autoencoderkl_encode, self.module, f, out=dest, device=f.device,
                                    tile=plan.tile, store=plan.store, group=self._group())

    def _decode_frames(self, f, dest):
        _inference_only()
        plan = self._plan(("decode", f.shape, f.dtype, f.device), executor.autoencoderkl_decode,
                          max(f.shape[-2:]) * self.patch_size[1], self.module, f, out=dest,
                          divisor=self.scaling_factor)
        if plan.path == "plain":
            return super()._decode_frames(f, dest)
        if plan.path == "recompute":  # scaled latents divided tile by tile: no whole-frame copy
            return tiling.autoencoderkl_decode(self.module, f, _recompute_config(self.tiling, plan.tile), out=dest,
                                               divisor=self.scaling_factor)
        return executor.run_program(executor.autoencoderkl_decode, self.module, f, out=dest,
                                    divisor=self.scaling_factor, device=f.device, tile=plan.tile, store=plan.store,
                                    group=self._group())


class TiledTemporal(_Tiled):
    """Mixed in before a temporal VAE class (VAE_Temporal)."""

    def _tile(self) -> int:
        return self.tiling.temporal[0]  # latent pixels

    def _encode_moments(self, x):
        _inference_only()
        plan = self._plan(("encode", x.shape, x.dtype, x.device), executor.temporal_encode, max(x.shape[-2:]),
                          self, x)
        if plan.path == "plain":
            return super()._encode_moments(x)
        if plan.path == "recompute":
            return tiling.temporal_tiled(super()._encode_moments, self, x, _recompute_config(self.tiling, plan.tile))
        return executor.run_program(executor.temporal_encode, self, x, device=x.device, tile=plan.tile,
                                    store=plan.store, group=self._group())

    def _decode_latents(self, z, pad):
        _inference_only()
        plan = self._plan(("decode", z.shape, z.dtype, z.device, pad), executor.temporal_decode, max(z.shape[-2:]),
                          self, z, pad=pad)
        if plan.path == "plain":
            return super()._decode_latents(z, pad)
        if plan.path == "recompute":  # padding frames dropped per tile: never held at full H/W
            return tiling.temporal_tiled(lambda v: super(TiledTemporal, self)._decode_latents(v, pad), self, z,
                                         _recompute_config(self.tiling, plan.tile))
        return executor.run_program(executor.temporal_decode, self, z, pad=pad, device=z.device, tile=plan.tile,
                                    store=plan.store, group=self._group())


def _recompute_config(cfg: tiling.TilingConfig, tile: int) -> tiling.TilingConfig:
    """cfg for the low-memory path at the planned tile (its overlap kept where the tile has room for it)."""
    if tile == cfg.tile_size:
        return cfg
    overlap = min(cfg.overlap, (tile - 16) // 2 // 16 * 16)
    return replace(cfg, tile_size=tile, overlap=overlap, temporal_tile_size=None, temporal_overlap=None)


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
            m.__dict__.pop("_tiling_plans", None)
