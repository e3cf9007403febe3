#!/usr/bin/env bash
# The CUDA checks of issues #5 and #7, as one script for a lent GPU machine (H100/H200 class with
# torch + transformers but no mlx or diffusers). Not run by CI. Budget: ~10 min of GPU time.
#
# Wheels for that machine (Python 3.12), fetched here into the ignored folder .whl/:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_35_x86_64 -d .whl \
#     mlx==0.32.4 mlx-cuda-13==0.32.4 diffusers==0.42.1
# (the library imports no mlx-lm; the machine has the nvidia-* libraries mlx-cuda-13 needs)
# mlx-cuda-13 (~90 MB) exceeds one call's 64 MiB, so it travels in two parts:
#   (cd .whl && split -b 45M mlx_cuda_13-*.whl mlx_cuda_13.part- && rm mlx_cuda_13-*.whl)
# Call 1 carries .whl with only part "aa" in it and runs `bash benchmarks/gpu_checks.sh stash`;
# call 2 (within the machine's warm window) carries the other parts and small wheels and runs
# `bash benchmarks/gpu_checks.sh`. Results land in $OUT.
set -euo pipefail
OUT=${OUT:-/tmp/ideo4-gpu-out}
STASH=/tmp/ideo4-whl
mkdir -p "$STASH" "$OUT"
if [[ "${1:-}" == "stash" ]]; then
    cp .whl/* "$STASH"/
    ls -la "$STASH"
    exit 0
fi
cp .whl/* "$STASH"/
wheel="$STASH/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl"
cat "$STASH"/mlx_cuda_13.part-* > "$wheel"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$STASH"/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), mx.ones(2) + 1)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/machine.txt"

# #5: end-to-end MLX (CUDA) vs the torch reference on CUDA, tiny checkpoint, fp32 then bf16.
python3 -m ideogram4_mlx synth /tmp/ideo4-tiny --preset tiny --force
for dtype in float32 bfloat16; do
    python3 -m ideogram4_mlx crosscheck /tmp/ideo4-tiny --preset V4_TURBO_12 --device cuda \
        --dtype "$dtype" 2>&1 | tee "$OUT/crosscheck_$dtype.txt"
done

# #7: one guided step, ours vs diffusers, bf16 on the GPU, with achieved TFLOP/s.
timeout 360 python3 benchmarks/dit_step.py --device gpu --dtype bfloat16 --impls ours diffusers \
    --layers 2 4 --sizes 512 1024 --json "$OUT/dit_step_gpu_bf16.jsonl" 2>&1 |
    grep -v "it/s\|B/s" | tee "$OUT/dit_step_gpu_bf16.txt"
timeout 120 python3 benchmarks/block_profile.py --device gpu --dtype bfloat16 \
    --tokens 1324 5096 2>&1 | tee "$OUT/block_profile_gpu_bf16.txt"
