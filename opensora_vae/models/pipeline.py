"""VideoAutoencoderPipeline: the spatial VAE, then the temporal VAE, with latent normalisation."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..registry import MODELS, build_from_cfg, to_plain
from . import winograd
from .distributions import DiagonalGaussianDistribution
from .pretrained import CONFIG_NAME, WEIGHTS_NAME, load_strict, read_config, read_state_dict, resolve_pretrained
from .spatial import SDXL_VAE_HUB_ID, check_video, sdxl_vae_config

OPENSORA_V1_2_SHIFT = (-0.10, 0.34, 0.27, 0.98)
OPENSORA_V1_2_SCALE = (3.85, 2.32, 2.33, 3.06)


class PipelineOutput(NamedTuple):
    """What training needs from one pass: unpacks like the reference's loss-mode tuple."""

    x_rec: Optional[torch.Tensor]  # pixels decoded from x_z_rec (None when decode_pixels=False)
    x_z_rec: torch.Tensor  # the temporal VAE's reconstruction of x_z
    z: torch.Tensor  # temporal latent sample, before shift/scale
    posterior: DiagonalGaussianDistribution  # over every micro-chunk
    x_z: torch.Tensor  # spatial VAE latents


def _channel_buffer(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(1, -1, 1, 1, 1)


def _check_parts(parts: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    if not parts or set(parts) - {"spatial", "temporal"}:
        raise ValueError(f"parts must name 'spatial' and/or 'temporal', got {list(parts)}")
    return parts


@MODELS.register_module()
class VideoAutoencoderPipeline(nn.Module):
    """Constructor arguments are the saved config (config.json); see `from_pretrained` / `save_pretrained`.

    micro_frame_size: the temporal VAE sees chunks of this many frames, each padded on its own (None: whole clip).
    cal_loss: kept for configs written for the reference; `forward` always returns the training tuple.
    from_pretrained: when given, weights are loaded from it (strict names) after building from these arguments.
    """

    def __init__(
        self,
        vae_2d: Optional[dict] = None,
        vae_temporal: Optional[dict] = None,
        from_pretrained: Optional[str] = None,
        freeze_vae_2d: bool = False,
        cal_loss: bool = False,
        micro_frame_size: Optional[int] = None,
        shift: Union[float, Sequence[float]] = 0.0,
        scale: Union[float, Sequence[float]] = 1.0,
    ):
        super().__init__()
        if vae_2d is None or vae_temporal is None:
            raise ValueError("VideoAutoencoderPipeline needs both vae_2d and vae_temporal config dicts")
        if micro_frame_size is not None and micro_frame_size < 1:
            raise ValueError(f"micro_frame_size must be a positive integer or None, got {micro_frame_size}")
        self.config = dict(vae_2d=to_plain(vae_2d), vae_temporal=to_plain(vae_temporal), from_pretrained=None,
                           freeze_vae_2d=freeze_vae_2d, cal_loss=cal_loss, micro_frame_size=micro_frame_size,
                           shift=to_plain(shift), scale=to_plain(scale))
        self.spatial_vae = build_from_cfg(vae_2d, MODELS)
        self.temporal_vae = build_from_cfg(vae_temporal, MODELS)
        if self.spatial_vae.out_channels != self.temporal_vae.in_out_channels:
            raise ValueError(
                f"spatial VAE gives {self.spatial_vae.out_channels} latent channels but the temporal VAE takes "
                f"{self.temporal_vae.in_out_channels}"
            )
        self.micro_frame_size = micro_frame_size
        self.freeze_vae_2d = freeze_vae_2d
        self.cal_loss = cal_loss
        self.register_buffer("shift", _channel_buffer(shift))
        self.register_buffer("scale", _channel_buffer(scale))
        self.out_channels = self.temporal_vae.out_channels
        if freeze_vae_2d:
            self.spatial_vae.requires_grad_(False)
        if from_pretrained is not None:
            _, weights = resolve_pretrained(from_pretrained)
            load_strict(self, read_state_dict(weights), str(weights))

    # ----- encode / decode -------------------------------------------------------------------------------
    def _chunks(self, length: int, size: Optional[int]):
        size = size or length
        return [(i, min(i + size, length)) for i in range(0, length, size)]

    def _encode(self, x, sample_posterior=True, generator=None):
        check_video(x, self.spatial_vae.in_channels, self.spatial_vae.patch_size[1])
        x_z = self.spatial_vae.encode(x, sample_posterior=sample_posterior, generator=generator)
        parts = [self.temporal_vae.encode(x_z[:, :, a:b]) for a, b in self._chunks(x_z.shape[2], self.micro_frame_size)]
        posterior = DiagonalGaussianDistribution.cat(parts, dim=2)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return z, posterior, x_z

    def _temporal_decode_chunks(self, z, num_frames, normalised=False):
        """(first frame, spatial latents of that micro-chunk) for each micro-chunk of z, in order; `normalised`
        latents are un-normalised a chunk at a time (that copy is freed before the chunk is yielded)."""
        expected = self.get_latent_size([num_frames, None, None])[0]
        if z.shape[2] != expected:
            raise ValueError(f"{z.shape[2]} latent frames cannot decode to num_frames={num_frames} (that needs {expected})")
        if self.micro_frame_size is None:
            micro_z, micro_x = z.shape[2], num_frames
        else:
            micro_z, micro_x = self.temporal_vae.get_latent_size([self.micro_frame_size])[0], self.micro_frame_size
        for n, (a, b) in enumerate(self._chunks(z.shape[2], micro_z)):
            first = n * micro_x
            part = (z[:, :, a:b] * self.scale).add_(self.shift) if normalised else z[:, :, a:b]
            x_z = self.temporal_vae.decode(part, num_frames=min(micro_x, num_frames - first))
            del part
            yield first, x_z

    def _decode(self, z, num_frames, decode_pixels=True):
        x_z = None
        for first, part in self._temporal_decode_chunks(z, num_frames):
            if part.shape[2] == num_frames:  # one chunk: no copy
                x_z = part
                break
            if x_z is None:
                x_z = part.new_empty(*part.shape[:2], num_frames, *part.shape[3:])
            x_z[:, :, first:first + part.shape[2]] = part
        x = self.spatial_vae.decode(x_z) if decode_pixels else None
        return x, x_z

    def encode(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Video (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, 4, T', H/8, W/8)."""
        z, _, _ = self._encode(x, sample_posterior, generator)
        return (z - self.shift) / self.scale

    def encode_posterior(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the latent posterior, normalised as `encode` normalises (the mean is
        `encode(x, sample_posterior=False)` bit for bit; std / scale); the spatial VAE gives its mean."""
        _, posterior, _ = self._encode(x, sample_posterior=False)
        return (posterior.mean - self.shift) / self.scale, posterior.std / self.scale

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised latents -> video with `num_frames` frames (the encoded clip's length)."""
        check_video(z, self.out_channels, name="latent")
        # Streamed: each micro-chunk's spatial latents are decoded straight into its frames of one preallocated
        # output, so memory beyond the output does not grow with the number of frames (bench/bench_memory.py).
        out = None
        for first, x_z in self._temporal_decode_chunks(z, num_frames, normalised=True):
            if out is None:
                h, w = (n * self.spatial_vae.patch_size[1] for n in x_z.shape[-2:])
                out = x_z.new_empty(x_z.shape[0], self.spatial_vae.in_channels, num_frames, h, w)
            self.spatial_vae.decode(x_z, out=out[:, :, first:first + x_z.shape[2]])
        return out

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = True,
        generator: Optional[torch.Generator] = None,
        decode_pixels: bool = True,
    ) -> PipelineOutput:
        """Training pass (no shift/scale): (x_rec, x_z_rec, z, posterior, x_z)."""
        z, posterior, x_z = self._encode(x, sample_posterior, generator)
        x_rec, x_z_rec = self._decode(z, num_frames=x_z.shape[2], decode_pixels=decode_pixels)
        return PipelineOutput(x_rec, x_z_rec, z, posterior, x_z)

    def forward_spatial(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: Optional[torch.Generator] = None
    ) -> PipelineOutput:
        """The spatial VAE alone as a training pass (x_z_rec None, z = x_z, its own posterior): fits the spatial
        VAE with the pixel losses where no pretrained one exists (the demo's stage 0)."""
        posterior = self.spatial_vae.posterior(x)
        x_z = (posterior.sample(generator) if sample_posterior else posterior.mode()) * self.spatial_vae.scaling_factor
        return PipelineOutput(self.spatial_vae.decode(x_z), None, x_z, posterior, x_z)

    def get_latent_size(self, input_size: Sequence[Optional[int]]) -> list:
        """[T', H', W'] of the latents for an input of [T, H, W] (entries may be None)."""
        size = self.temporal_vae.get_latent_size(self.spatial_vae.get_latent_size(list(input_size)))
        t, m = input_size[0], self.micro_frame_size
        if m is not None and t is not None:
            per_chunk = self.temporal_vae.get_latent_size([m])[0]
            size[0] = (t // m) * per_chunk + (self.temporal_vae.get_latent_size([t % m])[0] if t % m else 0)
        return size

    def enable_tiling(self, tile_size: int = 512, overlap: int = 64, temporal_tile_size: Optional[int] = None,
                      temporal_overlap: Optional[int] = None, exact_norms: Optional[int] = None,
                      tile_mid_block: bool = False) -> None:
        """Encode/decode any resolution in bounded memory: H/W tiles through both VAEs (opensora_vae.models.tiling;
        tile sizes in pixels, temporal_* in latent pixels). Frames within one tile give the untiled result.
        exact_norms: GroupNorms (in call order) given the whole frame's statistics, one truncated tiled pass each
        (None: all, about L/2 extra passes for L norms; 0: per-tile statistics, no extra pass, tiles show).
        tile_mid_block: run the spatial decoder's mid-block per tile as well (its attention still over the whole
        frame, keys/values recomputed per key tile): decode memory no longer grows with the frame, same result, but
        every statistics pass recomputes the frame's first mid-block resnet per tile (slower; default: the
        mid-block on the whole latent frame). The encoder's mid-block always runs on the whole frame."""
        kwargs = dict(tile_size=tile_size, overlap=overlap, temporal_tile_size=temporal_tile_size,
                      temporal_overlap=temporal_overlap, exact_norms=exact_norms, tile_mid_block=tile_mid_block)
        self.spatial_vae.enable_tiling(**kwargs)
        self.temporal_vae.enable_tiling(**kwargs)

    def disable_tiling(self) -> None:
        self.spatial_vae.disable_tiling()
        self.temporal_vae.disable_tiling()

    def enable_compile(self, parts: Union[str, Sequence[str]] = ("spatial", "temporal"), **options) -> None:
        """torch.compile (in place, `nn.Module.compile`: weights and state_dict names unchanged) the networks that
        hold the time: the encoder and decoder of the spatial VAE and/or the temporal VAE (`parts`: "spatial",
        "temporal" or both). `options` go to torch.compile (default dynamic=False: one graph per input shape,
        e.g. per micro-batch size). Chunking, padding and sampling stay eager. Works for training too (backward
        through AOTAutograd). The first call per shape compiles (minutes for the full model); inductor caches the
        result on disk (TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_$USER), so later processes on the
        same machine reuse it. Outputs match eager to float rounding, not bitwise."""
        options = {"dynamic": False, **options}
        for net in self._compiled_parts(parts):
            net.compile(**options)

    def enable_winograd(self) -> None:
        """fp32 CPU inference: the 3x3 (x time taps) convolutions of at least 128 channels of the spatial VAE and of
        the temporal decoder through Winograd F(4x4, 3x3) (opensora_vae.models.winograd; 1.20-1.28x for the whole
        pipeline on 2 cores, `bench/RESULTS.md`). Outputs move by float rounding: on real clips at random weights
        they land 2-3x closer to a float64 run than eager's (3.5e-5 vs 0.75-1e-4) and 0.7-1.0e-4 from eager's. The
        transformed weights stay cached on the modules: 2.5 GiB for the temporal decoder, plus 0.5 GiB for the
        spatial VAE at 64x64 frames (1.1 GiB from 128x128). The temporal encoder stays plain (its 2.1 GiB would buy
        about 0.4 s per 17 frames; `winograd.use_winograd(model.temporal_vae.encoder)` opts it in). Training,
        other dtypes and devices keep the plain convolutions."""
        for net in (self.spatial_vae.module, self.temporal_vae.decoder):
            winograd.use_winograd(net)

    def disable_winograd(self) -> None:
        # The whole temporal VAE: also an encoder opted in by hand.
        for net in (self.spatial_vae.module, self.temporal_vae):
            winograd.use_winograd(net, enable=False)

    def enable_subpixel(self) -> None:
        """See VideoAutoencoderKL.enable_subpixel (on by default)."""
        self.spatial_vae.enable_subpixel()

    def disable_subpixel(self) -> None:
        self.spatial_vae.disable_subpixel()

    def _compiled_parts(self, parts: Union[str, Sequence[str]] = ("spatial", "temporal")):
        parts = _check_parts(parts)
        kl = self.spatial_vae.module
        return (((kl.encoder, kl.decoder) if "spatial" in parts else ())
                + ((self.temporal_vae.encoder, self.temporal_vae.decoder) if "temporal" in parts else ()))

    def enable_gradient_checkpointing(self, parts: Union[str, Sequence[str]] = ("spatial", "temporal")) -> None:
        """Recompute activations in backward, per res block, in the temporal VAE and/or the (trained) spatial VAE."""
        parts = _check_parts(parts)
        if "temporal" in parts:
            self.temporal_vae.enable_gradient_checkpointing()
        if "spatial" in parts and not self.freeze_vae_2d:
            self.spatial_vae.enable_gradient_checkpointing()

    @property
    def device(self) -> torch.device:
        return self.shift.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ----- published format --------------------------------------------------------------------------------
    def save_pretrained(self, folder: Union[str, os.PathLike]) -> None:
        """Write config.json + model.safetensors (the published layout); each file is replaced atomically."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = copy.deepcopy(self.config)
        # Record the spatial architecture so loading rebuilds it offline.
        cfg["vae_2d"]["config"] = self.spatial_vae.architecture_config()
        cfg.update(architectures=["VideoAutoencoderPipeline"], model_type="VideoAutoencoderPipeline")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = folder / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        os.replace(tmp, folder / CONFIG_NAME)
        tmp = folder / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        # safetensors creates the file owner-only; shared checkpoints need the usual umask-based mode.
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, folder / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: Union[str, os.PathLike],
        cache_dir: Optional[str] = None,
        local_files_only: bool = False,
        torch_dtype: Optional[torch.dtype] = None,
        **overrides,
    ) -> "VideoAutoencoderPipeline":
        """Load a published-format folder, weights file, trainer checkpoint or hub id; `overrides` replace
        config entries (e.g. micro_frame_size, freeze_vae_2d) and, for `micro_batch_size`, the spatial VAE's."""
        config_path, weights = resolve_pretrained(str(path_or_id), cache_dir, local_files_only)
        if config_path is None:
            raise FileNotFoundError(f"{CONFIG_NAME} missing beside {weights}: cannot tell the model's structure")
        cfg = read_config(config_path)
        cfg.pop("from_pretrained", None)
        state = read_state_dict(weights)
        cfg["vae_2d"] = dict(cfg["vae_2d"])
        if any(k.startswith("spatial_vae.") for k in state):
            # The checkpoint carries the spatial weights: build the architecture locally, no hub download.
            cfg["vae_2d"]["config"] = cfg["vae_2d"].get("config") or sdxl_vae_config()
            cfg["vae_2d"]["from_pretrained"] = None
        cfg["vae_temporal"] = dict(cfg["vae_temporal"], from_pretrained=None)
        if "micro_batch_size" in overrides:
            cfg["vae_2d"]["micro_batch_size"] = overrides.pop("micro_batch_size")
        unknown = set(overrides) - set(cfg) - {"vae_2d", "vae_temporal"}
        if unknown:
            raise TypeError(f"unknown override(s) for {cls.__name__}: {sorted(unknown)}")
        cfg.update(overrides)
        with torch.device("meta"):  # skip random init: every tensor comes from the checkpoint
            model = cls(**cfg)
        load_strict(model, state, str(weights), assign=True)
        # Frozen parts keep their flag: assign=True replaces the parameter objects.
        if model.freeze_vae_2d:
            model.spatial_vae.requires_grad_(False)
        return model.to(torch_dtype) if torch_dtype is not None else model


@MODELS.register_module()
def OpenSoraVAE_V1_2(
    micro_batch_size: Optional[int] = 4,
    micro_frame_size: Optional[int] = 17,
    from_pretrained: Optional[str] = None,
    local_files_only: bool = False,
    freeze_vae_2d: bool = False,
    cal_loss: bool = False,
    cache_dir: Optional[str] = None,
    vae_2d: Optional[dict] = None,
    vae_temporal: Optional[dict] = None,
    force_huggingface: bool = False,  # accepted for reference configs; loading always goes through from_pretrained
) -> VideoAutoencoderPipeline:
    """The published Open-Sora 1.2 VAE. With `from_pretrained` (hub id, folder, file or trainer checkpoint)
    the weights are loaded; otherwise the spatial VAE comes from `vae_2d` (default: the SDXL VAE from the hub)
    and the temporal VAE (`vae_temporal`, default VAE_Temporal_SD) is randomly initialised."""
    if from_pretrained is not None:
        config_path, weights = resolve_pretrained(str(from_pretrained), cache_dir, local_files_only)
        if config_path is not None:  # the resolved file (config.json beside it): no second hub look-up
            return VideoAutoencoderPipeline.from_pretrained(
                weights, cache_dir=cache_dir, local_files_only=local_files_only,
                micro_batch_size=micro_batch_size, micro_frame_size=micro_frame_size,
                freeze_vae_2d=freeze_vae_2d, cal_loss=cal_loss,
            )
        # A bare weights file: the structure is this function's (published, or as vae_2d/vae_temporal say).
        model = OpenSoraVAE_V1_2(
            micro_batch_size, micro_frame_size, None, local_files_only, freeze_vae_2d, cal_loss, cache_dir,
            vae_2d=dict(vae_2d or {}, from_pretrained=None), vae_temporal=vae_temporal,
        )
        load_strict(model, read_state_dict(weights), str(weights))
        return model
    # Partial dicts are merged onto the published parts, e.g. vae_2d=dict(from_pretrained=LOCAL_DIR).
    vae_2d = dict(
        dict(type="VideoAutoencoderKL", from_pretrained=SDXL_VAE_HUB_ID, subfolder="vae",
             local_files_only=local_files_only, cache_dir=cache_dir, micro_batch_size=micro_batch_size),
        **(vae_2d or {}),
    )
    vae_temporal = dict(dict(type="VAE_Temporal_SD", from_pretrained=None), **(vae_temporal or {}))
    return VideoAutoencoderPipeline(
        vae_2d=vae_2d,
        vae_temporal=vae_temporal,
        freeze_vae_2d=freeze_vae_2d, cal_loss=cal_loss, micro_frame_size=micro_frame_size,
        shift=list(OPENSORA_V1_2_SHIFT), scale=list(OPENSORA_V1_2_SCALE),
    )
