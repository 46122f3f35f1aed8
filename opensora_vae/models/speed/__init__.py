"""Fast paths and runtime options, outside the model files. Each fast path swaps a module's class for a subclass with
the same parameters and state-dict names: `Conv2d` / `Conv3d` (the first backend enabled on the module that applies to
the call and measured faster on this machine, `calibrate`, else PyTorch's forward), `subpixel.Upsample2D`, the
`tiled` VAEs. `RuntimeOptionsMixin` gives the models enable_<name>() / disable_<name>(); `apply_runtime_options` maps
config values onto them. Nothing here imports the model files: a VAE class says what it is (`vae_part`)."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from . import calibrate, derived, onednn, subpixel, winograd
from .tiled import set_tiling
from .tiling import TilingConfig

# name -> backend module: wins(conv) (the shapes it serves), applies(x) (the calls), forward(conv, x); on CPU each
# call shape is timed once against the rest of the chain (`calibrate`).
BACKENDS = {"winograd": winograd, "onednn": onednn}


class _Dispatch:
    backends: Tuple[str, ...] = ()  # enabled on this module, in `BACKENDS` order

    def forward(self, x):
        if x.ndim == len(self.kernel_size) + 2:  # batched
            return run(self, x, self.backends)
        return super().forward(x)


def run(conv: nn.Module, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """conv(x) through the first backend of `names` that applies to the call and measured faster here than the
    rest of the chain (`calibrate`), else PyTorch's convolution (always, for the fake tensors of tiling's plans: the
    backends' kernels have no shape-only form)."""
    for i, name in enumerate(() if isinstance(x, FakeTensor) else names):
        backend = BACKENDS[name]
        if backend.applies(x) and calibrate.chooses(name, conv, x, backend.forward,
                                                    lambda c, v, rest=tuple(names[i + 1:]): run(c, v, rest)):
            return backend.forward(conv, x)
    return conv._conv_forward(x, conv.weight, conv.bias)


class Conv2d(_Dispatch, nn.Conv2d):
    pass


class Conv3d(_Dispatch, nn.Conv3d):
    pass


_SWAP = {nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}
_PLAIN = {v: k for k, v in _SWAP.items()}


def use_backend(module: nn.Module, name: str, enable: bool = True, force: bool = False) -> int:
    """Backend `name` on for each nn.Conv2d / nn.Conv3d of `module` where it fits (its `wins`; `force`: each), or off
    for each (its cached weights dropped); a convolution is a `Conv2d` / `Conv3d` while a backend is on. Returns how
    many changed."""
    changed = [m for m in module.modules() if (type(m) in _SWAP or type(m) in _PLAIN)
               and (name in getattr(m, "backends", ())) != enable and (not enable or force or BACKENDS[name].wins(m))]
    for m in changed:
        on = [n for n in BACKENDS if (n in getattr(m, "backends", ()) and n != name) or (n == name and enable)]
        m.__dict__["backends"] = tuple(on)
        derived.drop(m, getattr(BACKENDS[name], "CACHE", None))
        m.__class__ = (_SWAP if on else _PLAIN).get(type(m), type(m))
    return len(changed)


# Config key -> <name>: None leaves the option alone, False calls disable_<name>(), True enable_<name>(), a dict
# enable_<name>(**dict), another value enable_<name>(value) (micro_batch_size: frames per spatial VAE call).
RUNTIME_OPTIONS = {"compile": "compile", "winograd": "winograd", "subpixel": "subpixel", "tiling": "tiling",
                   "micro_batch_size": "micro_batching"}
Parts = Union[str, Sequence[str]]


def apply_runtime_options(model: nn.Module, **options: Any) -> nn.Module:
    """Each of `RUNTIME_OPTIONS` given on a built model; returns it."""
    unknown = sorted(set(options) - set(RUNTIME_OPTIONS))
    if unknown:
        raise TypeError(f"unknown runtime option(s) {unknown}; known: {sorted(RUNTIME_OPTIONS)}")
    for key, value in options.items():
        name = RUNTIME_OPTIONS[key]
        if value is False:
            getattr(model, f"disable_{name}")()
        elif value is True or isinstance(value, dict):
            getattr(model, f"enable_{name}")(**({} if value is True else value))
        elif value is not None:
            getattr(model, f"enable_{name}")(value)
    return model


class RuntimeOptionsMixin:
    """enable_<name>(...) / disable_<name>() of each runtime option for a spatial or temporal VAE or a pipeline (its
    VAEs); enable_<name> raises TypeError unless in `_supported_options`, disable_<name> of an option off is a no-op."""

    _supported_options: Tuple[str, ...] = ("compile", "winograd", "subpixel", "tiling", "micro_batching")
    tiling: Optional[TilingConfig] = None  # a tiled VAE's configuration
    vae_part: Optional[str] = None  # "spatial" / "temporal": the VAE classes say which they are (a pipeline: None)

    def _apply_default_options(self, **options: Any) -> None:
        """End of the constructor: the fast paths on by default (sub-pixel, oneDNN Conv3d), then `options`."""
        subpixel.use_subpixel(self)
        use_backend(self, "onednn")
        apply_runtime_options(self, **options)

    def _supports(self, name: str) -> None:
        if name not in self._supported_options:
            raise TypeError(f"{type(self).__name__} has no enable_{name}(): not one of its runtime options")

    def _vaes(self, parts: Parts = ("spatial", "temporal")) -> List[Tuple[str, nn.Module]]:
        """(part, VAE) for each spatial and/or temporal VAE (`parts`) of this model: itself, or a pipeline's."""
        parts = (parts,) if isinstance(parts, str) else tuple(parts)
        if not parts or set(parts) - {"spatial", "temporal"}:
            raise ValueError(f"parts must name 'spatial' and/or 'temporal', got {list(parts)}")
        return [(m.vae_part, m) for m in self.modules() if getattr(m, "vae_part", None) in parts]

    def _compiled_parts(self, parts: Parts = ("spatial", "temporal")) -> List[nn.Module]:
        """The networks that hold the time: each VAE's encoder and decoder (the spatial VAE's AutoencoderKL's)."""
        nets = [m.module if part == "spatial" else m for part, m in self._vaes(parts)]
        return [n for net in nets for n in (net.encoder, net.decoder)]

    def enable_compile(self, parts: Parts = ("spatial", "temporal"), **options: Any) -> None:
        """torch.compile in place (`nn.Module.compile`) the encoders and decoders of `parts`; `options` go to
        torch.compile (default dynamic=False: one graph per input shape). Outputs match eager to float rounding."""
        self._supports("compile")
        for net in self._compiled_parts(parts):
            net.compile(**{"dynamic": False, **options})

    def disable_compile(self, parts: Parts = ("spatial", "temporal")) -> None:
        for net in self._compiled_parts(parts):
            net._compiled_call_impl = None  # what nn.Module.compile set: eager calls again

    def enable_winograd(self) -> None:
        """fp32 CPU inference: the convolutions of the spatial VAE and the temporal decoder where Winograd measured
        faster (`winograd.wins`; `use_backend(vae.encoder, "winograd")` opts the temporal encoder in too)."""
        self._supports("winograd")
        for part, m in self._vaes():
            use_backend(m if part == "spatial" else m.decoder, "winograd")

    def disable_winograd(self) -> None:
        use_backend(self, "winograd", enable=False)

    def enable_subpixel(self) -> None:
        """The spatial decoder's upsamplers as folded 2x2 convolutions (`subpixel`); on by default."""
        self._supports("subpixel")
        subpixel.use_subpixel(self)

    def disable_subpixel(self) -> None:
        subpixel.use_subpixel(self, enable=False)

    def enable_tiling(self, **kwargs: Any) -> None:
        """Any H/W in bounded memory: overlapping tiles through the VAEs (`tiling`; arguments: `TilingConfig`)."""
        self._supports("tiling")
        set_tiling(self, TilingConfig(**kwargs))

    def disable_tiling(self) -> None:
        set_tiling(self, None)

    def enable_micro_batching(self, micro_batch_size: int) -> None:
        """The spatial VAE runs `micro_batch_size` frames per AutoencoderKL call (bounded memory)."""
        self._supports("micro_batching")
        if isinstance(micro_batch_size, bool) or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive integer, got {micro_batch_size!r}")
        for _, m in self._vaes("spatial"):
            m.micro_batch_size = micro_batch_size

    def disable_micro_batching(self) -> None:
        """All frames in one AutoencoderKL call."""
        for _, m in self._vaes("spatial"):
            m.micro_batch_size = None
