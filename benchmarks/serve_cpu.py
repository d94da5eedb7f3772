"""Original (GQA, stock LlamaForCausalLM) vs converted (MLA, transmla_vllm) on vLLM CPU.

For each model pair, each engine runs in its own subprocess with identical settings (dtype,
eager, no chunked prefill, no prefix caching, same --kv-cache-memory-bytes and batch limits):
the original, the converted checkpoint with the plugin's fused CPU MLA prefill, and (with
--prefill both, the default) the converted checkpoint with vLLM's own CPU MLA prefill
(TRANSMLA_CPU_PREFILL=0), so every ratio is measured in one run. Each reports:

* KV cache capacity in tokens, as vLLM itself sized it (num_blocks * block_size);
* time to first token of one long prompt alone (median of a few);
* with many concurrent long requests (enough to fill the largest of the caches; the other
  engines run them in waves): output tokens/s end to end, tokens/s and batch of the pure
  decode steps, median TTFT;
* a torch.profiler breakdown of a short run of each engine of the last pair, the prompt step
  and the decode steps apart.

Pairs: the bundled SmolLM2-135M-Instruct (converted with latent 256 + rope 64; CPU_MLA pads it
to 576 > 384 elements, so capacity drops on CPU), and a random reduced-depth model with
Llama-3-8B attention (4096 hidden, 32 heads, 8 KV heads x 128: 2048 elements per token and
layer) converted to latent 512 + rope 64 = 576 (3.56x less).

    python benchmarks/serve_cpu.py                     # both prefills: writes docs/benchmarks.md
    python benchmarks/serve_cpu.py --quick --no-docs   # short prompts, small caches: smoke test
    python benchmarks/serve_cpu.py --report-only       # redo docs from the saved results

Models and results are cached under --workdir (default .cache/serve_cpu). The code lives in
benchmarks/serve_cpu_lib/ (models, engine loop, profile, statistics, report).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_cpu_lib, also when imported

from serve_cpu_lib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
