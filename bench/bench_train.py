"""Training step time and peak memory of the published stage 3 config, levers side by side, with ratios.

Every variant is a real `Trainer` built from configs/vae/train/stage3.py (random weights: no SDXL download; LPIPS
with a random VGG so its cost is in the step; `--model tiny` swaps in the tiny widths) and steps through
`Trainer.train_step` (forward, loss, backward, clipping, AdamW) on the same random clips. Variants alternate step
by step, so a loaded machine slows them alike; all start from the same weights (the trainer's seed).

Levers (config options; `plain` is the published config as is):
  foreach           optimizer = dict(foreach=True)   (torch's default on CUDA already)
  fused             optimizer = dict(fused=True)     (one fused AdamW kernel)
  compile_temporal  model.compile = dict(parts="temporal")  (torch.compile of the temporal VAE's encoder/decoder)
  compile           model.compile = True              (also the spatial VAE's)
  ckpt_temporal     grad_checkpoint = "temporal"      (recompute only the temporal VAE's res blocks)
  ckpt_spatial      grad_checkpoint = "spatial"
  no_ckpt           grad_checkpoint = False           (keep all activations)
  no_subpixel       model.subpixel = False            (diffusers' upsampling instead of the default sub-pixel one)
  adversarial       discriminator = NLayerDiscriminator (the reference's PatchGAN), from step 0, LeCAM 1e-3
                    (the generator pass with its adaptive weight, the discriminator's two passes and its AdamW)
  decoder_only      trainable = "decoder"            (both encoders frozen: what decoder fine-tuning costs)
  ema               ema_decay = 0.999                (an fp32 average of the trained weights)
  fused+compile_temporal, ...: "+" joins levers.

Memory per variant: its parameters and AdamW state plus the rise of the device's allocation during its step over
the allocation just before it (CUDA max allocated; process peak RSS on CPU, where the allocator's reuse makes the
rise a lower bound), so variants held side by side in one process are still told apart.
The published strategy draws a random clip length every step (`mixed_video_random`); here the length is fixed at
--frames unless --mixed (a fixed length keeps compile at one graph per network and steps comparable).

python bench/bench_train.py --device cuda --frames 33 --size 256 --steps 4 --levers fused compile_temporal no_ckpt
python bench/bench_train.py --device cpu --model tiny --dtype fp32 --frames 17 --size 64 --threads 2
python bench/bench_train.py --device cpu --model tiny --dtype fp32 --frames 9 --size 64 \\
    --levers adversarial decoder_only ema

`--model wan cogvideox ltx` (any of them): diffusers' video VAEs side by side instead of levers, each a real `Trainer`
of its fine-tuning template (configs/vae/train/finetune_wan.py; finetune_cogvideox.py for CogVideoX and LTX-Video:
the whole model, pixel losses with LPIPS, EMA) at reduced widths with the published compression (CLASSES below,
random weights: no download), without gradient checkpointing (Wan has none in diffusers); --frames must fit every
class's rule (17 fits 4k+1 and 8k+1).
python bench/bench_train.py --device cpu --model wan cogvideox ltx --frames 17 --size 64 --threads 2
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import _peak_gib, _reset_peak, header, provenance, provenance_end, sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGE3 = ROOT / "configs" / "vae" / "train" / "stage3.py"
TINY_WIDTHS = ROOT / "configs" / "vae" / "tiny" / "widths.py"
TRAIN = ROOT / "configs" / "vae" / "train"
# --model NAME -> (template, class, reduced widths with the published compression: Wan 4x8x8, CogVideoX 4x8x8 with
# its 8k+1 batches, LTX-Video 8x32x32)
CLASSES = {
    "wan": ("finetune_wan.py", "AutoencoderKLWan", dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4],
                                                        num_res_blocks=1)),
    "cogvideox": ("finetune_cogvideox.py", "AutoencoderKLCogVideoX",
                  dict(block_out_channels=(32, 64, 128, 128), latent_channels=16, layers_per_block=1,
                       norm_num_groups=16)),
    "ltx": ("finetune_cogvideox.py", "AutoencoderKLLTXVideo",
            dict(block_out_channels=(32, 64, 128, 128), decoder_block_out_channels=(32, 64, 128, 128),
                 latent_channels=32, layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5)),
}

LEVERS = {
    "plain": {},
    "foreach": {"optimizer": dict(foreach=True)},
    "fused": {"optimizer": dict(fused=True)},
    "compile_temporal": {"model.compile": dict(parts="temporal")},
    "compile": {"model.compile": True},
    "ckpt_temporal": {"grad_checkpoint": "temporal"},
    "ckpt_spatial": {"grad_checkpoint": "spatial"},
    "no_ckpt": {"grad_checkpoint": False},
    "no_subpixel": {"model.subpixel": False},
    "adversarial": {"discriminator": dict(type="NLayerDiscriminator"), "discriminator_start": 0,
                    "lecam_loss_weight": 1e-3},
    "decoder_only": {"trainable": "decoder"},
    "ema": {"ema_decay": 0.999},
}


def lever_options(name: str) -> dict:
    out = {}
    for part in name.split("+"):
        if part not in LEVERS:
            raise SystemExit(f"unknown lever {part!r}; choose from {', '.join(LEVERS)} (join with '+')")
        out.update(LEVERS[part])
    return out


def _current_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _static_gib(trainer) -> float:
    """Parameters (model + loss, discriminator) and the optimizers' state tensors, the EMA's copy."""
    tensors = list(trainer.step_module.parameters())
    optimizers = [trainer.optimizer]
    if trainer.discriminator is not None:
        tensors += list(trainer.discriminator.parameters())
        optimizers.append(trainer.disc_optimizer)
    tensors += [v for o in optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    if trainer.ema is not None:
        tensors += list(trainer.ema.state_dict().values())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def build_trainer(name: str, args, data_csv: Path, outputs: Path):
    from mmengine.config import Config

    from opensora_vae.config import load_config
    from opensora_vae.train import Trainer

    options = {"dataset.data_path": str(data_csv), "outputs": str(outputs), "run_name": name.replace("+", "_"),
               "model.vae_2d.from_pretrained": None, "lpips_random_backbone": True, "device": args.device,
               "dtype": args.dtype, "dataset.num_frames": args.frames, "dataset.image_size": (args.size, args.size),
               "num_workers": 0, "trackers": [], "ckpt_every": 0, "shard_optimizer": False}
    if not args.mixed:
        options["mixed_strategy"] = None
    if args.model[0] == "tiny":
        widths = Config.fromfile(str(TINY_WIDTHS))
        options["model.vae_2d"] = widths._tiny_vae_2d.to_dict()
        options["model.vae_temporal"] = widths._tiny_vae_temporal.to_dict()
    if name in CLASSES:
        template, cls, widths = CLASSES[name]
        options.pop("model.vae_2d.from_pretrained")
        cfg = load_config(TRAIN / template, dict(options, grad_checkpoint=False))
        cfg.model = dict(type=f"diffusers:{cls}", config=widths)  # the whole entry: random weights, no download
        return Trainer(cfg, config_name="bench")
    options.update(lever_options(name))
    return Trainer(load_config(STAGE3, options), config_name="bench")


def write_clip(folder: Path, frames: int, size: int) -> Path:
    """One synthetic clip (moving noise) long and large enough for the dataset (its rows are never timed)."""
    from opensora_vae.data import write_video

    g = torch.Generator().manual_seed(0)
    base = torch.rand(3, size, size, generator=g) * 255
    video = torch.stack([torch.roll(base, shifts=(t, 2 * t), dims=(1, 2)) for t in range(frames)]).to(torch.uint8)
    write_video(folder / "clip.mp4", video, 24)
    (folder / "data.csv").write_text(f"path\n{folder / 'clip.mp4'}\n")
    return folder / "data.csv"


def run(args):
    device = torch.device(args.device)
    by_class = args.model[0] in CLASSES
    names = list(args.model) if by_class else ["plain"] + [n for n in args.levers if n != "plain"]
    clips = [torch.rand(args.batch, 3, args.frames, args.size, args.size, generator=torch.Generator().manual_seed(i))
             * 2 - 1 for i in range(args.warmup + args.steps)]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        csv = write_clip(Path(tmp), args.frames, args.size)
        trainers = {n: build_trainer(n, args, csv, Path(tmp) / "runs") for n in names}
        params = {n: sum(p.numel() for p in t.model.parameters()) / 1e6 for n, t in trainers.items()}
        what = ("fine-tuning templates, " + ", ".join(f"{n} {m:.1f}M" for n, m in params.items()) + " parameters"
                if by_class else f"stage 3 ({args.model[0]} model, {params['plain']:.1f}M parameters)")
        print(f"{header(device)}, {what}, dtype {args.dtype}, "
              f"clip {args.batch}x{args.frames}x{args.size}x{args.size}, "
              f"{args.warmup} warm-up + {args.steps} timed steps",
              flush=True)
        res = {n: {"times": [], "peak": 0.0, "loss": []} for n in names}
        for step in range(args.warmup + args.steps):
            for n, trainer in trainers.items():
                before = _current_gib(device)
                _reset_peak(device)
                t = time.perf_counter()
                out = trainer.train_step({"video": clips[step]})
                sync(device)
                seconds = time.perf_counter() - t
                rise = _peak_gib(device) - before
                res[n]["loss"].append(float(out["loss"]))
                if step < args.warmup:
                    if step == 0:
                        print(f"{n}: first step {seconds:.1f} s (compilation included where compiled)", flush=True)
                    continue
                res[n]["times"].append(seconds)
                res[n]["peak"] = max(res[n]["peak"], _static_gib(trainer) + rise)
        for trainer in trainers.values():
            trainer.close()
    if by_class:
        return _class_table(res, device, params)
    base = statistics.median(res["plain"]["times"])
    mem = "peak CUDA alloc GiB" if device.type == "cuda" else "peak RSS GiB (lower bound)"
    print(f"| variant | s / step | {mem} | ratio to plain (time) | memory ratio | max loss diff (relative) |")
    print("|---|---|---|---|---|---|")
    for n, r in res.items():
        sec = statistics.median(r["times"])
        diff = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(r["loss"], res["plain"]["loss"]))
        rows[n] = dict(seconds=sec, peak_gib=r["peak"], ratio=base / sec, mem_ratio=r["peak"] / res["plain"]["peak"],
                       loss_diff=diff)
        print(f"| {n} | {sec:.3f} | {r['peak']:.2f} | {base / sec:.2f}x | {rows[n]['mem_ratio']:.2f}x | {diff:.1e} |",
              flush=True)
    return rows


def _class_table(res, device, params):
    mem = "peak CUDA alloc GiB" if device.type == "cuda" else "peak RSS GiB (lower bound)"
    print(f"| model | parameters (M) | s / step | {mem} |")
    print("|---|---|---|---|")
    rows = {}
    for n, r in res.items():
        rows[n] = dict(seconds=statistics.median(r["times"]), peak_gib=r["peak"], parameters_m=params[n])
        print(f"| {CLASSES[n][1]} | {params[n]:.1f} | {rows[n]['seconds']:.3f} | {r['peak']:.2f} |", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="default: the config's bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--model", nargs="+", choices=["full", "tiny", *CLASSES], default=["full"],
                        help="full or tiny: the Open-Sora pipeline with --levers; or diffusers classes side by side")
    parser.add_argument("--frames", type=int, default=33, help="clip length (stage 3: 33)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--mixed", action="store_true", help="keep the config's random clip length per step")
    parser.add_argument("--levers", nargs="+", default=["fused", "compile_temporal", "ckpt_temporal", "no_ckpt"],
                        help=f"from {', '.join(LEVERS)}; '+' combines")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = provenance(args.device)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    logging.basicConfig(level=logging.WARNING)
    if len(args.model) > 1 and not all(m in CLASSES for m in args.model) or args.model[0] in CLASSES and \
            not all(m in CLASSES for m in args.model):
        raise SystemExit(f"--model: full or tiny alone, or classes from {', '.join(CLASSES)}")
    for name in args.levers:
        lever_options(name)
    rows = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(provenance=provenance_end(info), rows=rows), indent=2))


if __name__ == "__main__":
    main()
