#!/usr/bin/env bash
# The CUDA checks of the streaming converter, in one bounded run on a machine with a GPU
# (torch, transformers, safetensors and tokenizers installed; vLLM is not needed):
#
#     OUT=gpu-results bash benchmarks/gpu_session.sh
#
# 1. benchmarks/gpu_check.py: the same 4-layer conversion (Llama-3-8B attention geometry) on
#    cpu and cuda; PASS when the two converted models' logits agree within 1e-3.
# 2. benchmarks/convert_scaling.py --device cuda: wall time and peak host RSS at 2 and 4
#    Llama-3-8B-shaped layers and at 1 and 3 Llama-3.1-70B-shaped layers, 128 calibration
#    chunks (the converter's default).
# Each step has its own time limit and a failing step does not stop the next; logs go to $OUT.
set -u
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
{
  nvidia-smi -L
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
  echo "cpus $(nproc)"
} 2>&1 | tee "$OUT/env.txt"

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - started)) s" | tee -a "$OUT/$name.log"
  grep -v "INFO\|converting layers\|Loading weights\|^\s*$" "$OUT/$name.log" | tail -16
}

step gpu_check 200 $PY benchmarks/gpu_check.py --layers 4 --workdir /tmp/gpu-check
step scaling_cuda_8b 150 $PY benchmarks/convert_scaling.py --device cuda --layers 2,4 \
  --calib-samples 128 --no-write --workdir /tmp/scaling-8b
step scaling_cuda_70b 200 $PY benchmarks/convert_scaling.py --device cuda --shape 70b \
  --layers 1,3 --calib-samples 128 --no-write --workdir /tmp/scaling-70b
