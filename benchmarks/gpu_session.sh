#!/usr/bin/env bash
# The GPU checks, in one bounded run on a machine with a GPU (torch, transformers, safetensors
# and tokenizers installed; vLLM is not needed):
#
#     OUT=gpu-results bash benchmarks/gpu_session.sh [STEPS...]
#
# Steps (all by default):
#   gpu_check   benchmarks/gpu_check.py: the same 4-layer conversion (Llama-3-8B attention
#               geometry, the default method refit-recon) on cpu and cuda; PASS when the two
#               converted models' logits agree within 1e-3.
#   heal_8b     benchmarks/heal_gpu.py: the Llama-3.1-8B heal recipe (2 x 2048 tokens per step,
#               attention trained, bf16): measured peak GPU memory and tokens/s next to the
#               estimate heal prints.
#   scaling     benchmarks/convert_scaling.py --device cuda: wall time and peak host RSS at 2 and
#               4 Llama-3-8B-shaped layers and at 1 and 3 Llama-3.1-70B-shaped layers.
# Each step has its own time limit and a failing step does not stop the next; logs go to $OUT.
set -u
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
STEPS=${*:-gpu_check heal_8b scaling}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
cd "$(dirname "$0")/.."
{
  nvidia-smi -L
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
  echo "cpus $(nproc); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} 2>&1 | tee "$OUT/env.txt"

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - started)) s" | tee -a "$OUT/$name.log"
  grep -v "INFO\|converting layers\|Loading weights\|^\s*$" "$OUT/$name.log" | tail -24
}

step gpu_check 200 $PY benchmarks/gpu_check.py --layers 4 --method refit-recon \
  --workdir /tmp/gpu-check
step heal_8b 240 $PY benchmarks/heal_gpu.py --json "$OUT/heal_8b.json"
step scaling 300 $PY benchmarks/convert_scaling.py --device cuda --layers 2,4 \
  --calib-samples 128 --no-write --workdir /tmp/scaling-8b
