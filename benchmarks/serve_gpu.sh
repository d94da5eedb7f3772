#!/usr/bin/env bash
# Original vs converted under `vllm serve` on one GPU, back to back, with `vllm bench serve`.
#
#   benchmarks/serve_gpu.sh ORIGINAL_DIR CONVERTED_DIR [OUT_DIR]
#
# For each model: start `vllm serve` with the same settings (same --kv-cache-memory-bytes, so
# the KV cache gets the same bytes and only its layout differs), wait for /health, run
# `vllm bench serve` on the random dataset for every length in LENGTHS (input = output length,
# NUM_PROMPTS prompts sent at once, ignore_eos), save each result as JSON, stop the server.
# Then benchmarks/summarize_gpu.py writes OUT_DIR/summary.md (throughput, TTFT, TPOT and
# the KV cache size each server logged).
#
# Environment (defaults):
#   LENGTHS="1024 2048 4096 8192 16384"  input = output tokens per request
#   NUM_PROMPTS=64                       prompts per length (all sent at t=0)
#   KV_CACHE_BYTES=21474836480           20 GiB of KV cache for both; "auto" uses GPU_UTIL
#   GPU_UTIL=0.9                         --gpu-memory-utilization when KV_CACHE_BYTES=auto
#   DTYPE=bfloat16  PORT=8000  VLLM=vllm  PYTHON=python
#   SERVE_ARGS=""                        extra `vllm serve` flags for both (e.g. --kv-cache-dtype fp8)
# Long lengths take a while: at 16k in + 16k out the original serves few requests at a time.
# Needs the GPU build of vllm (its `vllm` command) and curl. The figures are yours to produce.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d'
    exit 2
fi
ORIGINAL=$1
CONVERTED=$2
OUT=${3:-serve_gpu_results}
LENGTHS=${LENGTHS:-"1024 2048 4096 8192 16384"}
NUM_PROMPTS=${NUM_PROMPTS:-64}
KV_CACHE_BYTES=${KV_CACHE_BYTES:-21474836480}
GPU_UTIL=${GPU_UTIL:-0.9}
DTYPE=${DTYPE:-bfloat16}
PORT=${PORT:-8000}
VLLM=${VLLM:-vllm}
PYTHON=${PYTHON:-python}
SERVE_ARGS=${SERVE_ARGS:-}
HERE=$(cd "$(dirname "$0")" && pwd)

max_len=0
for n in $LENGTHS; do
    (( 2 * n > max_len )) && max_len=$(( 2 * n ))
done
max_len=$(( max_len + 64 ))
if [[ $KV_CACHE_BYTES == auto ]]; then
    memory_args=(--gpu-memory-utilization "$GPU_UTIL")
else
    memory_args=(--kv-cache-memory-bytes "$KV_CACHE_BYTES")
fi
mkdir -p "$OUT"
server_pid=""

stop_server() {
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        wait "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
    # the next server needs the port (and the GPU memory): wait until nothing answers
    local deadline=$(( SECONDS + 120 ))
    while curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && (( SECONDS < deadline )); do
        sleep 2
    done
}
trap stop_server EXIT INT TERM

wait_healthy() {
    local deadline=$(( SECONDS + 1800 ))
    until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            echo "vllm serve exited; see $1" >&2
            exit 1
        fi
        if (( SECONDS > deadline )); then
            echo "vllm serve not healthy after 30 min; see $1" >&2
            exit 1
        fi
        sleep 5
    done
}

for label in original converted; do
    model=$ORIGINAL
    [[ $label == converted ]] && model=$CONVERTED
    log="$OUT/$label-server.log"
    # shellcheck disable=SC2086  # SERVE_ARGS is a list of flags
    "$VLLM" serve "$model" --served-model-name "$label" --port "$PORT" \
        --dtype "$DTYPE" --max-model-len "$max_len" --trust-remote-code \
        "${memory_args[@]}" $SERVE_ARGS >"$log" 2>&1 &
    server_pid=$!
    echo "[$label] vllm serve $model (pid $server_pid, log $log)"
    wait_healthy "$log"
    grep -m1 -E "KV cache size: [0-9,]+ tokens" "$log" || true
    for n in $LENGTHS; do
        echo "[$label] bench: $NUM_PROMPTS prompts x ($n in + $n out)"
        "$VLLM" bench serve --backend vllm --base-url "http://127.0.0.1:$PORT" \
            --model "$model" --served-model-name "$label" --trust-remote-code \
            --dataset-name random --random-input-len "$n" --random-output-len "$n" \
            --num-prompts "$NUM_PROMPTS" --ignore-eos --seed 0 \
            --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 \
            --save-result --result-dir "$OUT" --result-filename "$label-$n.json" \
            --metadata "engine=$label" "length=$n" "kv_cache_memory=$KV_CACHE_BYTES" \
            | tee "$OUT/$label-$n.txt"
    done
    stop_server
done

"$PYTHON" "$HERE/summarize_gpu.py" "$OUT" | tee "$OUT/summary.md"
