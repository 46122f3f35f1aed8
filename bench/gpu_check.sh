#!/usr/bin/env bash
# One prepared run on a lent GPU machine: installs carried wheels (.whl), checks CUDA/bf16 correctness, runs
# published training stages for a few steps under torchrun (NCCL), then the side-by-side benchmark.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
[ -z "${SKIP_CHECKS:-}" ] && python3 bench/cuda_check.py 2>&1 | tee "$OUT/cuda_check.txt"
python3 - <<'PY'
import torch
from opensora_vae.data import write_video
g = torch.Generator().manual_seed(0)
base = torch.rand(3, 72, 96, generator=g) * 255
for i in range(2):  # moving content, 60 frames
    frames = torch.stack([torch.roll(base, shifts=(t, 2 * t), dims=(1, 2)) for t in range(60)])
    frames = torch.nn.functional.interpolate(frames, size=(288, 384), mode="bilinear").clamp(0, 255).to(torch.uint8)
    write_video(f"/tmp/clip{i}.mp4", frames, 24)
open("/tmp/gpu.csv", "w").write("path\n/tmp/clip0.mp4\n/tmp/clip1.mp4\n")
PY
for stage in 1 3; do
  timeout 240 torchrun --standalone --nproc_per_node=1 scripts/train_vae.py configs/vae/train/stage$stage.py \
    --data-path /tmp/gpu.csv --outputs /tmp/train$stage --cfg-options model.vae_2d.from_pretrained=None \
    max_steps=4 ckpt_every=0 num_workers=2 allow_missing_lpips=True tensorboard=False mixed_strategy=None 2>&1 | grep -v "train:" | tail -4
  tail -2 /tmp/train$stage/*/metrics.jsonl | tee "$OUT/train_stage$stage.jsonl"
done
[ -n "${SKIP_BENCH:-}" ] && exit 0
# Issue 9 figures: per-part times, each lever vs plain (bf16 17x256x256), 51x720x1280, metrics on the GPU.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
timeout 420 python3 bench/bench_vae.py --device cuda --frames 17 --size 256 --repeat 5 --sections parts levers \
  --json "$OUT/bench_levers.json" 2>&1 | tee "$OUT/bench.txt"
timeout 150 python3 bench/bench_vae.py --device cuda --frames 51 --size 720 --width 1280 --repeat 2 --sections parts 2>&1 | tee -a "$OUT/bench.txt"
timeout 120 python3 bench/bench_metrics.py --device cuda --clips 5 --repeat 3 2>&1 | tee "$OUT/bench_metrics.txt"
# Issue 9 target 5: stage 3 training step (full size, bf16 autocast, 33x256x256), each lever vs the published config.
timeout 570 python3 bench/bench_train.py --device cuda --frames 33 --size 256 --warmup 2 --steps 3 \
  --levers fused compile_temporal compile ckpt_temporal no_ckpt fused+compile_temporal+ckpt_temporal \
  --json "$OUT/bench_train.json" 2>&1 | grep -v "train:" | tee "$OUT/bench_train.txt"
python3 bench/bench_vae.py --device cuda --frames 17 --size 256 --repeat 3 --sections conv dtype micro --json "$OUT/bench.json" 2>&1 | tee -a "$OUT/bench.txt"
python3 bench/bench_vae.py --device cuda --frames 51 --size 512 --repeat 2 --sections conv micro 2>&1 | tee -a "$OUT/bench.txt"
# Issue 9 targets 3 and 4 (prepared, not yet run on a GPU): full-size structure, random weights, bf16.
# Tiled 17-frame encode and decode at 1080p and 4K (each under 2 GiB?), tiled vs untiled time at 1080p
# (no more than 15% slower?), and peak memory vs length (17 vs 257 frames within 10%?), old frame loop vs new.
for op in encode decode; do
  python3 bench/bench_memory.py resolution --device cuda --dtype bfloat16 --model full --op $op --frames 17 \
    --sizes 1080x1920 --tile-size 512 --overlap 64 2>&1 | tee -a "$OUT/tiling.txt"
  python3 bench/bench_memory.py resolution --device cuda --dtype bfloat16 --model full --op $op --frames 17 \
    --sizes 2160x3840 --tile-size 512 --overlap 64 --tiled-only 2>&1 | tee -a "$OUT/tiling.txt"
done
# The mid-block per tile too (enable_tiling(tile_mid_block=True)): 4K decode memory without the whole-frame mid-block.
python3 bench/bench_memory.py resolution --device cuda --dtype bfloat16 --model full --op decode --frames 17 \
  --sizes 2160x3840 --tile-size 512 --overlap 64 --tiled-only --tile-mid-block 2>&1 | tee -a "$OUT/tiling.txt"
python3 bench/bench_memory.py length --device cuda --dtype bfloat16 --model full --size 256 256 --frames 17 257 \
  2>&1 | tee -a "$OUT/tiling.txt"
# Tiles must not show: full-size SDXL spatial VAE (random weights, fp32), real 256x384 frame, 128-pixel tiles:
# diffusers' tiling vs this package's (per-tile and whole-frame statistics).
python3 bench/bench_tiling.py --device cuda --exact-norms 0 4 1000 2>&1 | tee -a "$OUT/tiling.txt"
