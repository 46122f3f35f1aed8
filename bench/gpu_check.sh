#!/usr/bin/env bash
# One prepared run on a lent GPU machine: installs carried wheels (.whl), checks CUDA/bf16 correctness, then the
# issue 9 figures, most wanted first. A lease is short (about 15 minutes, at most 10 a command): every step gets
# at most its cap and what is left of BUDGET seconds, and a step with under 20 s left is skipped (said so).
# STEPS="vae memory" runs only the named steps (names: check tiling vae memory train metrics stages long conv).
# Every bench script prints a provenance line first; the machine's copy of the tree has no .git, so pass the commit:
# BENCH_COMMIT=<commit> bash bench/gpu_check.sh.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
BUDGET=${BUDGET:-500}
STEPS=${STEPS:-"check tiling vae memory train metrics stages long conv"}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"

# step NAME CAP LOG COMMAND...: run COMMAND if NAME is in STEPS, under the smaller of CAP and the time left.
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  [[ " $STEPS " == *" $name "* ]] || return 0
  local left=$((BUDGET - SECONDS))
  if ((left < 20)); then
    echo "== $name: skipped, ${left}s of the budget left" | tee -a "$OUT/skipped.txt"
    return 0
  fi
  local limit=$((cap < left ? cap : left))
  echo "== $name ($*), up to ${limit}s"
  timeout "$limit" bash -c '"$@"' _ "$@" 2>&1 | grep --line-buffered -v "train:" | tee -a "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  ((rc == 124)) && echo "== $name: stopped at ${limit}s" | tee -a "$OUT/skipped.txt"
  return 0
}

make_clips() {  # two moving 60-frame clips and their CSV, for the training stages
  python3 - <<'PY'
import torch
from opensora_vae.data import write_video
g = torch.Generator().manual_seed(0)
base = torch.rand(3, 72, 96, generator=g) * 255
for i in range(2):
    frames = torch.stack([torch.roll(base, shifts=(t, 2 * t), dims=(1, 2)) for t in range(60)])
    frames = torch.nn.functional.interpolate(frames, size=(288, 384), mode="bilinear").clamp(0, 255).to(torch.uint8)
    write_video(f"/tmp/clip{i}.mp4", frames, 24)
open("/tmp/gpu.csv", "w").write("path\n/tmp/clip0.mp4\n/tmp/clip1.mp4\n")
PY
}

train_stage() {  # a few published-config steps under torchrun (NCCL), last metrics lines kept
  [ -f /tmp/gpu.csv ] || make_clips || return 1
  torchrun --standalone --nproc_per_node=1 scripts/train_vae.py configs/vae/train/stage$1.py \
    --data-path /tmp/gpu.csv --outputs /tmp/train$1 --cfg-options model.vae_2d.from_pretrained=None \
    max_steps=4 ckpt_every=0 num_workers=2 allow_missing_lpips=True trackers=[] mixed_strategy=None &&
    tail -2 /tmp/train$1/*/metrics.jsonl
}

memory() {  # target 3: tiled 17-frame encode/decode at 1080p (vs untiled) and 4K, bounded decode at 4K
  for op in decode encode; do
    python3 bench/bench_memory.py resolution --device cuda --dtype bfloat16 --model full --op $op --frames 17 \
      --sizes 1080x1920 --tile-size 512 --overlap 64
    python3 bench/bench_memory.py resolution --device cuda --dtype bfloat16 --model full --op $op --frames 17 \
      --sizes 2160x3840 --tile-size 512 --overlap 64 --tiled-only
  done
  python3 bench/bench_memory.py resolution --device cuda --dtype bfloat16 --model full --op decode --frames 17 \
    --sizes 2160x3840 --tile-size 512 --overlap 64 --tiled-only --tile-mid-block
}

export -f make_clips train_stage memory  # `step` runs commands in a child bash
step check 60 cuda_check.txt python3 bench/cuda_check.py
# Exact tiling (issue 30): full-size SDXL spatial VAE (random weights), a real frame resized to 1080p and 4K, fp32
# and bf16: PSNR and time against untiled (4K: untiled may not fit), the budget curve (time, peak memory; the
# smaller budgets keep the segments in pinned host memory), bf16 against float32; then both VAEs on 17 frames.
tiling() {
  for dtype in bfloat16 float32; do
    python3 bench/bench_tiling.py --device cuda --dtype $dtype --size 1080 1920 --tile-size 512 --no-diffusers \
      --budgets 8GiB 4GiB 2GiB
    python3 bench/bench_tiling.py --device cuda --dtype $dtype --size 2160 3840 --tile-size 512 --no-diffusers \
      --budgets 16GiB 8GiB 4GiB
  done
  python3 bench/bench_tiling.py --device cuda --dtype bfloat16 --checkpoint random --frames 17 --size 1080 1920 \
    --tile-size 512 --no-diffusers
}
export -f tiling
step tiling 240 tiling.txt tiling
# Target 1: per-part times and each lever vs the plain path, bf16 17x256x256 (compile levers pay their compilation).
step vae 170 bench.txt python3 bench/bench_vae.py --device cuda --frames 17 --size 256 --repeat 5 \
  --sections parts levers --json "$OUT/bench_levers.json"
step memory 120 tiling.txt memory
# Target 5: published stage 3 step (full size, bf16 autocast, 33x256x256), levers vs the published settings.
step train 120 bench_train.txt python3 bench/bench_train.py --device cuda --frames 33 --size 256 --warmup 2 \
  --steps 3 --levers fused ckpt_temporal no_ckpt no_subpixel --json "$OUT/bench_train.json"
# Target 6 on the GPU: SSIM/PSNR vs the reference's per-frame loops; LPIPS batched.
step metrics 45 bench_metrics.txt python3 bench/bench_metrics.py --device cuda --clips 5 --repeat 3
step stages 60 train_stage3.txt train_stage 3
step long 60 bench.txt python3 bench/bench_vae.py --device cuda --frames 51 --size 720 --width 1280 --repeat 2 \
  --sections parts
step conv 60 bench.txt python3 bench/bench_vae.py --device cuda --frames 17 --size 256 --repeat 3 \
  --sections conv dtype micro --json "$OUT/bench.json"
echo "== done in ${SECONDS}s of ${BUDGET}s"
