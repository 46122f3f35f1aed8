"""The VAE trainer: set-up, `train_step`, `train`; every stateful part saves through the checkpoint module."""
from __future__ import annotations

import gc
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from mmengine.config import Config

from ..config import check_config, save_config
from ..errors import RunError, UserError
from ..jobs import check_output_folder
from ..models.spatial import check_video
from ..protocol import package_versions
from ..provenance import recorded_model_config
from ..data import ResumableDistributedSampler, apply_mixed_strategy, collate_clips
from ..losses import build_loss
from ..models.autoencoders import VideoAutoencoder
from ..models.build import build_autoencoder
from ..models.pretrained import load_strict
from ..registry import DATASETS, MODELS, build_from_cfg, to_plain
from ..runtime import resolve_dtype
from . import checkpoint as ckpt
from ..distributed import any_rank, barrier, close_distributed, init_distributed, wrap_model
from ..adversarial import AdversarialLoss
from ..models.discriminator import NLayerDiscriminator
from .ema import EMA
from .logging import RunLogger, check_trackers, reconstruction_grid, setup_logging
from .runs import config_identity, find_resume, new_run_dir, read_identity, write_identity
from .steps import DiscriminatorStep, TrainStep
from ..signals import StopSignals, start_loader, worker_init

logger = logging.getLogger("opensora_vae.train")


DISCRIMINATOR, DISCRIMINATOR_OPTIMIZER = "discriminator.pt", "discriminator_optimizer.pt"


class NonFiniteLossError(RunError):
    pass


# Settings only the Open-Sora pipeline trains with (its spatial and temporal latents): key -> what it is.
OPEN_SORA_ONLY = {
    "use_z_rec_loss": "the latent reconstruction of the pipeline's spatial latents (stages 1-2)",
    "use_image_identity_loss": "the identity term between the pipeline's spatial and temporal latents",
    "train_spatial_only": "the pipeline's spatial VAE alone (stage 0)",
}


def mixed_lengths(cfg, vae: VideoAutoencoder, num_frames: int, image_frames: str = "repeat") -> Optional[list]:
    """The clip lengths a run may feed `vae`, checked before anything runs (one line naming the key): the data set's
    `num_frames`, 1 for image rows given as single frames or for `mixed_video_image` steps, and the lengths
    `mixed_video_random` draws from (returned: those of 1..num_frames the model's rule takes; None where it takes
    every length, the draw then as it always was)."""
    rule = vae.frame_rule

    def check(key: str, t: int) -> None:
        try:
            vae.check_frames(t)
        except UserError as err:
            raise UserError(f"{key}: {err}") from None

    check(f"dataset.num_frames={num_frames}", num_frames)
    if image_frames == "single":
        check("dataset.image_frames='single' (image rows are 1-frame clips)", 1)
    if cfg.mixed_strategy == "mixed_video_image" and cfg.mixed_image_ratio > 0:
        check("mixed_strategy='mixed_video_image' (its steps train on the first frame alone)", 1)
    if cfg.mixed_strategy != "mixed_video_random" or rule.factor == 1:
        return None
    return [t for t in range(1, num_frames + 1) if rule.valid(t)]


def check_family(cfg, vae: VideoAutoencoder) -> None:
    """Refuse, in one line naming the key, what only the Open-Sora pipeline trains with, on another model."""
    if vae.kind == "opensora":
        return
    on = [k for k in OPEN_SORA_ONLY if cfg.get(k)]
    if on:
        raise UserError(f"{on[0]}=True is Open-Sora-only ({OPEN_SORA_ONLY[on[0]]}): {vae.name} trains with the "
                        f"pixel terms (use_real_rec_loss: L1, LPIPS, KL) and the adversarial ones; set {on[0]}=False")
    if not cfg.use_real_rec_loss:
        raise UserError(f"use_real_rec_loss=False: {vae.name} has no other reconstruction term (the latent ones are "
                        f"Open-Sora-only); set use_real_rec_loss=True")
    if cfg.grad_checkpoint in ("temporal", "spatial"):
        raise UserError(f"grad_checkpoint={cfg.grad_checkpoint!r} names a VAE of the Open-Sora pipeline: "
                        f"{vae.name} takes True or False")


def lr_factor(warmup: int, schedule: Optional[dict], max_steps: Optional[int]):
    """Multiplier of `lr` at step s: linear warm-up, then constant (the published recipe) or, with
    `lr_schedule=dict(type="cosine", min_ratio=r)`, a cosine decay to r * lr at `max_steps` (short runs such as the
    demo's end far better annealed)."""
    schedule = schedule or {}
    kind = schedule.get("type", "constant")
    if kind not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule type {kind!r}: expected 'constant' or 'cosine'")
    if kind == "cosine" and not max_steps:
        raise UserError("lr_schedule type 'cosine' decays over max_steps: set max_steps")
    min_ratio = float(schedule.get("min_ratio", 0.0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Trainer:
    def __init__(self, cfg, config_name: str = "run", load: Optional[str] = None):
        self.cfg = cfg
        self.config_name = config_name
        self.load = load
        self.preempted: Optional[str] = None  # the stop signal's name once the run stopped on one
        self.setup()

    # ----- set-up -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.cfg = cfg = check_config(self.cfg, "train")
        ckpt.check_retention(cfg.keep_last, cfg.keep_every)
        self.dist = init_distributed(cfg.device, cfg.dist_timeout)
        setup_logging(self.dist.rank)
        self.run_name = cfg.run_name or self.config_name
        self.identity = config_identity(cfg)
        self._on_rank0(check_trackers, cfg.trackers)
        # Decided on rank 0 (it may rename a recovered checkpoint) and sent to all, errors included. Every check
        # that can refuse the job comes before a run folder is made.
        run_dir, self.load_path = self._on_rank0(find_resume, Path(cfg.outputs), self.run_name, self.load,
                                                 self.identity)
        self._on_rank0(check_output_folder, run_dir or Path(cfg.outputs), "run folder" if run_dir else "outputs")
        self.device = self.dist.device
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.precision = cfg.precision
        seed = cfg.seed
        torch.manual_seed(seed)  # same initial weights on every rank

        self.dataset = build_from_cfg(cfg.dataset, DATASETS)
        self.batch_size = cfg.batch_size
        # The reference's sampler is seeded with 0 whatever `seed` is; `sampler_seed` keeps that order by default.
        self.sampler = ResumableDistributedSampler(
            self.dataset, self.dist.world_size, self.dist.rank, shuffle=True, seed=cfg.sampler_seed,
            drop_last=False,
        )

        # The model as a VideoAutoencoder (any family, one training path); self.model is the model itself (its
        # parameters, state dict and format are the checkpoint's).
        self.vae = build_autoencoder(cfg.model, self.device, log=self.dist.is_main)
        self.model = self.vae.model
        check_family(cfg, self.vae)
        self.mixed_lengths = mixed_lengths(cfg, self.vae, getattr(self.dataset, "num_frames", 1),
                                           getattr(self.dataset, "image_frames", "repeat"))
        # What the run saves describes what it trains: a --ckpt-path checkpoint may bring another structure.
        self.model_config = recorded_model_config(cfg.model, self.vae, log=self.dist.is_main)
        if self.precision == "params":
            self.model.to(self.dtype)
        # grad_checkpoint: True (the whole model), "temporal" or "spatial" (one VAE of the pipeline), False (none).
        grad_checkpoint = cfg.grad_checkpoint
        if grad_checkpoint:
            try:
                parts = {} if grad_checkpoint is True else {"parts": grad_checkpoint}
                self.vae.enable_gradient_checkpointing(**parts)
            except UserError as err:
                raise UserError(f"grad_checkpoint=True: {err}; set grad_checkpoint=False") from None
        # train_spatial_only: fit the spatial VAE alone (pixel losses; the temporal VAE frozen and unused), where
        # no pretrained spatial VAE exists (the demo's stage 0).
        spatial_only = cfg.train_spatial_only
        if spatial_only:
            if not cfg.use_real_rec_loss:
                raise UserError("train_spatial_only needs the pixel losses: set use_real_rec_loss=True")
            self.model.temporal_vae.requires_grad_(False)
        if cfg.trainable == "decoder":  # fine-tuned weights encode every clip to the same latents as before
            self.vae.freeze_encoder()
        self.loss_fn = build_loss(cfg).to(self.device)
        self._setup_discriminator()
        self.step_module = TrainStep(self.vae, self.loss_fn, cfg.sample_posterior, spatial_only,
                                     self.discriminator, self.adversarial).train()
        # The spatial decoder gets no gradient when only latents are reconstructed.
        # Another model's causal layers skip their temporal up/down-sampling on a 1-frame clip (an image row, a
        # mixed-strategy draw), so some of its parameters get no gradient at such a step.
        unused = self.vae.kind != "opensora" or (not self.loss_fn.use_real_rec_loss and any(
            p.requires_grad for p in self.model.spatial_vae.parameters()))
        find_unused = unused if cfg.find_unused_parameters is None else cfg.find_unused_parameters
        self.wrapped = wrap_model(self.step_module, self.dist, find_unused)
        # logvar is optimised only with learn_logvar (the reference never optimises it); clipping covers the model.
        self.params = [p for p in self.step_module.parameters() if p.requires_grad]
        self.model_params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self._build_optimizer(self.params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(cfg.warmup_steps, cfg.lr_schedule, cfg.max_steps))

        # Mixed-strategy draws (CPU): one stream seeded alike on every rank, one draw per step, so all ranks take
        # the same choice at a step (as the reference). Posterior noise (on the model's device): per rank.
        self.data_gen = torch.Generator().manual_seed(seed)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(seed + 1000 * self.dist.rank + 1)
        self.epoch = self.global_step = 0
        self.skipped_rows = 0
        self.nonfinite_steps = self.nonfinite_in_a_row = 0
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay is not None else None

        self._steps_per_epoch()
        self._on_rank0(self._check_data)
        self.run_dir = run_dir or self._on_rank0(new_run_dir, Path(cfg.outputs), self.run_name)
        if self.load_path is not None:
            self._resume(self.load_path)
        if self.dist.is_main:
            self._save_config()
            logger.info("run folder %s; %d rows; %d rank(s); %s %s; device %s", self.run_dir, len(self.dataset),
                        self.dist.world_size, self.dtype, self.precision, self.device)
        self.max_steps = cfg.max_steps
        total = self._steps_per_epoch() * cfg.epochs
        self.total_steps = min(total, self.max_steps) if self.max_steps else total
        self.run_logger = RunLogger(self.run_dir, self.dist.is_main, self.total_steps, self.global_step,
                                    trackers=cfg.trackers, resumed=self.load_path is not None,
                                    wandb_project=cfg.wandb_project, wandb_entity=cfg.wandb_entity)
        if self.dist.is_main:  # what config.py holds, and what ran it (package versions, the git commit)
            self.run_logger.start(dict(to_plain(self.cfg), model=self.model_config, provenance=package_versions()))
        self.sample_rows: list = []  # (step, this rank's rows) since the last log, with log_samples
        self._ckpt_bytes: Optional[int] = None

    def _steps_per_epoch(self) -> int:
        steps = self.sampler.num_samples // self.batch_size
        if steps == 0:
            raise ValueError(f"batch_size {self.batch_size} is larger than this rank's share of the data set "
                             f"({self.sampler.num_samples} rows)")
        return steps

    def _check_data(self) -> None:
        """One clip read and checked as the model will check it, before a run folder exists: a CSV whose every row
        is unreadable, or a frame size the model cannot take, ends the job here in one line (rank 0)."""
        with torch.random.fork_rng(devices=[]):  # reading draws nothing from the streams the run uses
            try:
                item = self.dataset[0]
            except RuntimeError as err:  # the dataset found no readable row
                raise RunError(str(err)) from err
        video = item.get("video") if isinstance(item, dict) else None
        if isinstance(video, torch.Tensor) and video.ndim == 4:
            if self.vae.kind == "opensora":
                spatial = self.model.spatial_vae
                check_video(video.unsqueeze(0), spatial.in_channels, spatial.patch_size[1])
            else:
                self.vae.check_size(*video.shape[-2:])

    def _save_config(self) -> None:
        """config.py: what the run trains (its model as built); run.json: the identity of the config that made it
        (`runs.config_identity`). A run resumed under another recipe keeps the config.py it ran before as
        config.until_stepN.py."""
        previous = read_identity(self.run_dir) if self.load_path is not None else None
        if previous is not None and previous != self.identity and (self.run_dir / "config.py").is_file():
            os.replace(self.run_dir / "config.py", self.run_dir / f"config.until_step{self.global_step}.py")
        saved = Config(dict(to_plain(self.cfg), model=self.model_config), filename=self.cfg.filename)
        save_config(saved, self.run_dir / "config.py")
        write_identity(self.run_dir, self.identity, str(self.cfg.filename or self.config_name))

    def _setup_discriminator(self) -> None:
        """`discriminator=dict(type=...)`: the adversarial loss, the discriminator (its own DDP) and its AdamW (the
        VAE's lr and settings, as the reference)."""
        cfg = self.cfg
        self.discriminator = self.adversarial = self.disc_optimizer = None
        if cfg.discriminator is None:
            return
        self.adversarial = build_loss(cfg, AdversarialLoss).to(self.device)
        self.discriminator = build_from_cfg(cfg.discriminator, MODELS).to(self.device).train()
        if not isinstance(self.discriminator, NLayerDiscriminator) and cfg.mixed_strategy is not None:
            raise UserError(f"discriminator type {cfg.discriminator['type']} takes whole clips of a fixed length: set "
                            f"mixed_strategy=None, or use NLayerDiscriminator (it sees frames)")
        if self.precision == "params":
            self.discriminator.to(self.dtype)
        self.disc_wrapped = wrap_model(DiscriminatorStep(self.discriminator, self.adversarial), self.dist)
        self.disc_optimizer = self._build_optimizer([p for p in self.discriminator.parameters() if p.requires_grad])

    def _build_optimizer(self, params):
        cfg = self.cfg
        kwargs = dict(lr=float(cfg.lr), weight_decay=float(cfg.weight_decay), betas=tuple(cfg.adam_betas),
                      eps=float(cfg.adam_eps), **cfg.optimizer)
        if cfg.shard_optimizer and self.dist.world_size > 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            # ZeRO-style: each rank keeps the AdamW state of its shard of the parameters only. Bucket views: one
            # broadcast per rank after the step, not one per parameter.
            return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW,
                                           parameters_as_bucket_view=True, **kwargs)
        return torch.optim.AdamW(params, **kwargs)

    def _on_rank0(self, fn, *args):
        """fn(*args) on rank 0, its result (or its error, raised alike) on every rank."""
        result = error = None
        if self.dist.is_main:
            try:
                result = fn(*args)
            except (OSError, ValueError) as err:
                error = err
        if self.dist.enabled:
            holder = [result, error]
            dist.broadcast_object_list(holder, src=0)
            result, error = holder
        if error is not None:
            raise error
        return result

    # ----- state -------------------------------------------------------------------------------------------
    def running_states(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "global_step": self.global_step, "sampler": self.sampler.state_dict(),
                "world_size": self.dist.world_size, "batch_size": self.batch_size,
                "skipped_rows": self.skipped_rows, "nonfinite_steps": self.nonfinite_steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "scheduler": self.scheduler.state_dict()}

    def save(self) -> Path:
        cfg = self.cfg
        if self.dist.is_main:  # warn while there is still room to act
            warning = ckpt.free_space_warning(self.run_dir, self._ckpt_bytes or self._estimated_checkpoint_bytes())
            if warning:
                logger.warning(warning)
        path = ckpt.save_checkpoint(
            self.run_dir, self.epoch, self.global_step, self.dist.rank, self.vae,
            self.loss_fn.state_dict(), ckpt.consolidated_optimizer_state(self.optimizer), self.running_states(),
            ckpt.rng_state({"data": self.data_gen, "noise": self.noise_gen}), self._checkpoint_extras(),
        )
        logger.info("saved checkpoint %s", path)
        if self.dist.is_main:
            self._ckpt_bytes = ckpt.checkpoint_bytes(path)
            deleted = ckpt.prune_checkpoints(self.run_dir, cfg.keep_last, cfg.keep_every)
            if deleted:
                logger.info("deleted %s (keep_last=%s, keep_every=%s)", ", ".join(p.name for p in deleted),
                            cfg.keep_last, cfg.keep_every)
        return path

    def _checkpoint_extras(self) -> Dict[str, Any]:
        """Collective (the sharded discriminator optimizer is gathered on rank 0)."""
        extras: Dict[str, Any] = {}
        if self.ema is not None:  # the model's own format: loadable by --ckpt-path RUN/epochE-global_stepS/ema
            extras["ema"] = lambda folder: self.vae.save_pretrained(folder,
                                                                    state_dict=self.ema.full_state_dict(self.model))
        if self.discriminator is not None:
            extras[DISCRIMINATOR] = {"model": self.discriminator.state_dict(), "loss": self.adversarial.state_dict()}
            extras[DISCRIMINATOR_OPTIMIZER] = ckpt.consolidated_optimizer_state(self.disc_optimizer)
        return extras

    def _estimated_checkpoint_bytes(self) -> int:
        """Before the first save: the weights plus AdamW's two moments per trainable value."""
        weights = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        return weights + sum(2 * p.numel() * p.element_size() for p in self.params)

    def _resume(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, self.dist.rank)
        load_strict(self.model, self.vae.saved_state_dict(state["model_dir"]), str(state["model_dir"]))
        if self.loss_fn.learn_logvar:
            self.loss_fn.load_state_dict(state["loss"])
        elif float(state["loss"]["logvar"]) != float(self.loss_fn.logvar):
            logger.warning("the checkpoint's logvar %.4g is not used: logvar stays at logvar_init %.4g (set "
                           "learn_logvar=True to resume a learned one)", float(state["loss"]["logvar"]),
                           float(self.loss_fn.logvar))
        self.optimizer.load_state_dict(state["optimizer"])
        running = state["running_states"]
        self.epoch, self.global_step = running["epoch"], running["global_step"]
        self.skipped_rows = running.get("skipped_rows", 0)
        self.nonfinite_steps = running.get("nonfinite_steps", 0)
        self.nonfinite_in_a_row = running.get("nonfinite_in_a_row", 0)
        if self.discriminator is not None:
            if (path / DISCRIMINATOR).is_file():
                saved = torch.load(path / DISCRIMINATOR, map_location=self.device, weights_only=True)
                load_strict(self.discriminator, saved["model"], str(path / DISCRIMINATOR))
                self.adversarial.load_state_dict(saved["loss"])
                self.disc_optimizer.load_state_dict(
                    torch.load(path / DISCRIMINATOR_OPTIMIZER, map_location="cpu", weights_only=True))
            else:
                logger.warning("%s has no discriminator: it starts from its initial weights", path)
        if self.ema is not None:
            if (path / "ema").is_dir():
                self.ema.load_state_dict(self.vae.saved_state_dict(path / "ema"))
            else:
                logger.warning("%s has no EMA: the average starts from its weights", path)
        self._rescale_batch(running["world_size"], running["batch_size"])
        # The sampler's global position continues the epoch on any number of ranks (older states: per rank).
        self.sampler.load_state_dict({"world_size": running["world_size"], **running["sampler"]})
        self.scheduler.load_state_dict(running["scheduler"])
        generators = {"data": self.data_gen, "noise": self.noise_gen}
        if state["rng"] is not None:
            ckpt.set_rng_state(state["rng"], generators)
        else:  # a rank the checkpoint did not have: the shared data stream from rank 0, its own noise stream
            rank0 = torch.load(path / "rng" / "rank0.pt", map_location="cpu", weights_only=True)
            self.data_gen.set_state(rank0["generators"]["data"])
        logger.info("resumed from %s at epoch %d, step %d (sample %d of the epoch)", path, self.epoch,
                    self.global_step, self.sampler.position)

    def _rescale_batch(self, world: int, batch: int) -> None:
        """On another number of ranks, keep the checkpoint's global batch when the per-rank batch allows it."""
        if world == self.dist.world_size:
            return
        old_global = world * batch
        if self.cfg.keep_global_batch and self.batch_size == batch and old_global % self.dist.world_size == 0:
            self.batch_size = old_global // self.dist.world_size
        new_global = self.batch_size * self.dist.world_size
        if self.dist.is_main:
            logger.warning("resuming a %d-rank run on %d rank(s): batch %d -> %d per rank, global batch %d -> %d; "
                           "the epoch continues with the rows not yet trained on", world, self.dist.world_size,
                           batch, self.batch_size, old_global, new_global)

    # ----- loop --------------------------------------------------------------------------------------------
    def train_step(self, batch: Dict[str, Any]) -> Dict[str, float]:
        x = batch["video"].to(self.device, non_blocking=True)
        x = apply_mixed_strategy(x, self.cfg.mixed_strategy, self.cfg.mixed_image_ratio, self.data_gen,
                                 self.mixed_lengths)
        use_autocast = self.precision == "autocast" and self.dtype != torch.float32
        if self.precision == "params":
            x = x.to(self.dtype)
        if self.discriminator is not None:
            self.discriminator.requires_grad_(False)  # the generator's loss trains the VAE only
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=use_autocast):
            terms, x_rec = self.wrapped(x, self.noise_gen, self.global_step)
        disc_terms = self._discriminator_forward(x, x_rec, use_autocast)
        loss = terms["loss"]
        out = {k: v.detach().float() for k, v in {**terms, **disc_terms}.items()}
        out["frames"] = torch.tensor(float(x.shape[2]), device=self.device)
        finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(v)) for v in disc_terms.values())
        if any_rank(not finite, self.device):
            self._nonfinite(batch, {**terms, **disc_terms})
            self.scheduler.step()  # the schedule follows the step count, updates or not
            out["grad_norm"] = torch.tensor(float("nan"), device=self.device)
            return out
        self.nonfinite_in_a_row = 0
        loss.backward()
        clip = self.cfg.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model_params, float(clip) if clip else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        if disc_terms:
            self._discriminator_update(disc_terms["disc_total"])
        out["grad_norm"] = grad_norm.detach().float()
        return out

    def _discriminator_forward(self, x: torch.Tensor, x_rec: Optional[torch.Tensor], use_autocast: bool):
        """The discriminator's loss on this step's clips and their reconstructions (before the VAE's update, as in
        the reference); {} while the adversarial terms do not act."""
        self._lecam = []
        if x_rec is None:
            return {}
        self.discriminator.requires_grad_(True)
        self._lecam = [b.clone() for b in self.adversarial.buffers()]  # restored if the step is skipped
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=use_autocast):
            d = self.disc_wrapped(x.detach(), x_rec, self.global_step)
        return {"disc_loss": d["disc_loss"], "lecam": d["lecam"], "gradient_penalty": d["gradient_penalty"],
                "disc_total": d["total"]}

    def _discriminator_update(self, total: torch.Tensor) -> None:
        total.backward()
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        if self.dist.enabled:  # the LeCAM averages of every rank's logits, so that one saved copy resumes them all
            for b in self.adversarial.buffers():
                dist.all_reduce(b)
                b.div_(self.dist.world_size)

    def _nonfinite(self, batch: Dict[str, Any], terms: Dict[str, torch.Tensor]) -> None:
        """A NaN/inf loss on any rank: stop (the default), or with on_nonfinite="skip" skip this update on every
        rank and stop only after max_nonfinite_in_a_row such steps in a row."""
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        where = (f"non-finite loss at step {self.global_step + 1} (epoch {self.epoch}) on rows "
                 f"{self._gather(batch['index'].tolist())}")
        values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        skip, limit = self.cfg.on_nonfinite == "skip", self.cfg.max_nonfinite_in_a_row
        if not skip or self.nonfinite_in_a_row >= limit:
            why = f" ({self.nonfinite_in_a_row} in a row, max_nonfinite_in_a_row={limit})" if skip else ""
            raise NonFiniteLossError(f"{where}{why}; nothing was saved for this step, the last checkpoint in "
                                     f"{self.run_dir} is intact. Terms: {values}")
        self.optimizer.zero_grad(set_to_none=True)
        if self.disc_optimizer is not None:
            self.disc_optimizer.zero_grad(set_to_none=True)
            for b, saved in zip(self.adversarial.buffers(), getattr(self, "_lecam", [])):
                b.copy_(saved)
        if self.dist.is_main:
            logger.warning("%s: update skipped (%d in a row, %d in all). Terms: %s", where, self.nonfinite_in_a_row,
                           self.nonfinite_steps, values)

    def _gather(self, value):
        """Every rank's `value`, in rank order (collective)."""
        if not self.dist.enabled:
            return [value]
        parts = [None] * self.dist.world_size
        dist.all_gather_object(parts, value)
        return parts

    def _log(self, metrics: Dict[str, torch.Tensor], seconds: float, steps: int) -> None:
        local = {k: float(v) for k, v in metrics.items()}
        local["skipped_rows"] = float(self.skipped_rows)
        local["nonfinite_steps"] = float(self.nonfinite_steps)
        if self.cfg.log_samples:
            local["rows"], self.sample_rows = self.sample_rows, []
        parts = [local]
        if self.dist.enabled:
            # Ranks may report different terms (the identity term exists only on single-frame steps).
            parts = [None] * self.dist.world_size
            dist.all_gather_object(parts, local)
        record: Dict[str, Any] = {"step": self.global_step, "epoch": self.epoch}
        if self.cfg.log_samples:  # {step: [rows of rank 0, rows of rank 1, ...]}: the rows behind each step
            rows = [dict(p.pop("rows")) for p in parts]
            record["rows"] = {str(step): [r[step] for r in rows] for step in rows[0]}
        for key in sorted({k for p in parts for k in p}):
            values = [p[key] for p in parts if key in p]
            record[key] = sum(values) if key == "skipped_rows" else sum(values) / len(values)
        record["skipped_rows"] = int(record["skipped_rows"])
        record["nonfinite_steps"] = int(record["nonfinite_steps"])  # the same count on every rank
        record["frames_per_rank"] = [p["frames"] for p in parts]  # the mixed-strategy draw each rank took
        record.update(lr=self.optimizer.param_groups[0]["lr"], sec_per_step=seconds / steps,
                      samples_per_sec=steps * self.batch_size * self.dist.world_size / max(seconds, 1e-9))
        if self.device.type == "cuda":
            record["max_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.run_logger.log(record)

    @torch.no_grad()
    def _log_reconstruction(self, batch: Dict[str, Any]) -> None:
        """Rank 0's first clip of the step above its reconstruction by the weights after the step (posterior
        mode; the run's random streams untouched), as an image to every tracker."""
        if not self.dist.is_main or not self.run_logger.trackers:
            return
        x = batch["video"][:1].to(self.device)
        use_autocast = self.precision == "autocast" and self.dtype != torch.float32
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), \
                torch.autocast(self.device.type, dtype=self.dtype, enabled=use_autocast):
            if self.cfg.train_spatial_only:  # the spatial VAE alone is trained: its reconstruction
                rec = self.model.forward_spatial(x.to(self.vae.dtype), sample_posterior=False).x_rec
            else:
                rec = self.vae.reconstruct(x)
        self.run_logger.log_images(self.global_step, {"train/reconstruction": reconstruction_grid(x[0], rec[0])})

    def _count_skips(self, batch: Dict[str, Any]) -> None:
        new = [p for s in batch.get("skipped", []) for p in s.split("\n") if p]
        if new:
            self.skipped_rows += len(new)
            logger.warning("skipped %d bad row(s) so far on rank %d (latest: %s)", self.skipped_rows,
                           self.dist.rank, new[-1])

    def _done(self) -> bool:
        return self.max_steps is not None and self.global_step >= self.max_steps

    def train(self) -> Optional[Path]:
        # What exists now (imported code, modules, tensors' wrappers: ~0.5M objects) lives for the whole run: out of
        # the collector's full passes, which otherwise walk it all (a measurable part of a demo step). Unfrozen after,
        # so that a caller's later garbage can still be collected.
        gc.freeze()
        try:
            return self._train()
        finally:
            gc.unfreeze()

    def _train(self) -> Optional[Path]:
        cfg = self.cfg
        log_every, ckpt_every, epochs = cfg.log_every, cfg.ckpt_every, cfg.epochs
        last_saved: Optional[Path] = None
        self._tick, self._steps_since = time.perf_counter(), 0
        stop = self._stop_signals = StopSignals(cfg.stop_signals).install()
        try:
            while self.epoch < epochs and not self._done():
                self.sampler.set_epoch(self.epoch)
                self.dataset.set_epoch(self.epoch)
                loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
                                    collate_fn=collate_clips, num_workers=cfg.num_workers,
                                    worker_init_fn=worker_init(cfg.stop_signals),
                                    pin_memory=self.device.type == "cuda")
                for batch in start_loader(loader, cfg.stop_signals):
                    self._count_skips(batch)
                    metrics = self.train_step(batch)
                    self.global_step += 1
                    self._steps_since += 1
                    self.sampler.advance(self.batch_size)
                    if cfg.log_samples:
                        self.sample_rows.append((self.global_step, batch["index"].tolist()))
                    if self.global_step % log_every == 0:
                        self._log_since(metrics)
                    if cfg.log_reconstructions_every and self.global_step % cfg.log_reconstructions_every == 0:
                        self._log_reconstruction(batch)
                    self.run_logger.step()  # after the log: the bar shows this step's loss
                    if ckpt_every and self.global_step % ckpt_every == 0:
                        last_saved = self.save()
                    # One all-reduce: every rank stops after the same step, even if only one was signalled.
                    if any_rank(stop.received is not None, self.device):
                        self._log_since(metrics)
                        return self._stop(stop, last_saved)
                    if self._done():
                        break
                else:
                    self.epoch += 1
            if self._steps_since:
                self._log_since(metrics)
            if last_saved is None or not last_saved.name.endswith(f"global_step{self.global_step}"):
                last_saved = self.save()
            barrier()  # rank 0 prunes after the save: no rank tears the process group down before it is done
            return last_saved
        finally:
            if self.preempted is None:
                stop.restore()

    def _log_since(self, metrics: Dict[str, torch.Tensor]) -> None:
        if self._steps_since:
            self._log(metrics, time.perf_counter() - self._tick, self._steps_since)
            self._tick, self._steps_since = time.perf_counter(), 0

    def _stop(self, stop: StopSignals, last_saved: Optional[Path]) -> Path:
        """Checkpoint at the agreed step and return; the script exits with EXIT_PREEMPTED."""
        name = stop.name or "a stop signal on another rank"
        if self.dist.is_main:
            logger.warning("%s: stopping after step %d to checkpoint (%.1f s after the signal)", name,
                           self.global_step, stop.seconds_since())
        started = time.perf_counter()
        if last_saved is None or not last_saved.name.endswith(f"global_step{self.global_step}"):
            last_saved = self.save()
        barrier()
        stop.ignore()
        self.preempted = name
        if self.dist.is_main:
            logger.warning("%s: checkpoint %s written in %.1f s; exiting %.1f s after the signal; rerun the same "
                           "command with --load auto to continue", name, last_saved, time.perf_counter() - started,
                           stop.seconds_since())
        return last_saved

    def close(self) -> None:
        # Called in a `finally`: an exception on its way out means the run failed (the trackers say so).
        failed = sys.exc_info()[0] is not None
        self.run_logger.close("failed" if failed else "preempted" if self.preempted else "done")
        close_distributed()
        if getattr(self, "_stop_signals", None) is not None:  # ignored during the close after a stop
            self._stop_signals.restore()
