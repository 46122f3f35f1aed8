"""CUDA correctness checks (run on a GPU machine): the reference fixture in fp32 and bf16, and the full-size
pipeline in bf16. Prints one line per check and exits non-zero when a check fails."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from common import provenance  # bench/ is the script's folder
from opensora_vae import build_model

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def fixture_model(case, meta, weights, device, dtype):
    model = build_model(dict(
        type="VideoAutoencoderPipeline",
        vae_2d=dict(type="VideoAutoencoderKL", config=meta["spatial_autoencoderkl"], micro_batch_size=4),
        vae_temporal=dict(type="VAE_Temporal", **meta["temporal"]),
        micro_frame_size=meta["cases"][case]["micro_frame_size"], shift=meta["shift"], scale=meta["scale"]))
    model.load_state_dict(weights)
    return model.to(device=device, dtype=dtype).eval()


def main() -> int:
    device = torch.device("cuda")
    provenance(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 for the 1e-4 comparison
    meta = json.loads((DATA / "tiny_pipeline.json").read_text())
    weights = load_file(str(DATA / "tiny_pipeline.safetensors"))
    io = load_file(str(DATA / "tiny_pipeline_io.safetensors"))
    ok = True
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.05)):
        for case in ("a", "b"):
            model = fixture_model(case, meta, weights, device, dtype)
            x = io[f"{case}.input"].to(device, dtype)
            with torch.inference_mode():
                z = model.encode(x, sample_posterior=False).float().cpu()
                dec = model.decode(io[f"{case}.z"].to(device, dtype), num_frames=x.shape[2]).float().cpu()
            ez = ((z - io[f"{case}.z"]).abs().max() / io[f"{case}.z"].abs().max()).item()
            ed = ((dec - io[f"{case}.decoded"]).abs().max() / io[f"{case}.decoded"].abs().max()).item()
            good = max(ez, ed) < tol
            ok &= good
            print(f"fixture {case} {str(dtype)[6:]:<9} max rel err z {ez:.2e} decoded {ed:.2e} "
                  f"(< {tol:g}): {'ok' if good else 'FAIL'}")
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = build_model(dict(type="OpenSoraVAE_V1_2", vae_2d=dict(from_pretrained=None)))
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    x = torch.rand(1, 3, 51, 256, 256, device=device, dtype=torch.bfloat16) * 2 - 1
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with torch.inference_mode():
        z = model.encode(x, sample_posterior=False)
        y = model.decode(z, num_frames=51)
    torch.cuda.synchronize()
    good = tuple(z.shape) == (1, 4, 15, 32, 32) and y.shape == x.shape and bool(torch.isfinite(y).all())
    ok &= good
    print(f"full-size bf16 51x256x256: z {tuple(z.shape)} y {tuple(y.shape)} finite {bool(torch.isfinite(y).all())} "
          f"{time.perf_counter() - t:.2f}s (first call) peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB: "
          f"{'ok' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
