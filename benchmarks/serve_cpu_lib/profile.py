"""torch.profiler over a short run: the prompt step (the prefill) and the decode steps apart."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from serve_cpu_lib.engine_loop import random_prompts, submit

PROFILE_REQUESTS, PROFILE_DECODE = 2, 16

# The attention ops of each engine (self CPU time), by what each prefill runs:
# the original's fused CPU attention (prefill and decode), the plugin's fused MLA prefill, and
# vLLM's dense MLA prefill (CPUSDPAMLAPrefillBackend._ragged_sdpa: `mul` is the scaling, but it
# also counts small elementwise ops elsewhere in the model)
ORIGINAL_ATTENTION = ("_C::cpu_attention_with_kv_cache",)
FUSED_PREFILL = ("aten::_scaled_dot_product_flash_attention_for_cpu",)
DENSE_PREFILL = ("aten::bmm", "aten::mul", "aten::_softmax", "aten::masked_fill_", "aten::triu")
MLA_DECODE = ("_C::mla_decode_kvcache",)
AMX_PREFILL = ("_C::extend_attention_cpu",)  # AMX_MLA forward_mha (ops.cpu_mla_extend)


def _top_ops(prof: Any, n: int = 40) -> list[dict[str, Any]]:
    rows = [
        {"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
        for e in prof.key_averages()
    ]
    rows.sort(key=lambda r: -r["self_cpu_s"])
    return rows[:n]


def profile_run(llm: Any, prompt_len: int, vocab: int, out: Path) -> None:
    """PROFILE_REQUESTS prompts of ``prompt_len`` tokens submitted together: one profile over the
    steps until each has its first token (the prefill), one over the PROFILE_DECODE - 1 decode
    steps that follow; top ops of each by self CPU time, and the steps' wall time."""
    from torch.profiler import ProfilerActivity, profile

    prompts = random_prompts(PROFILE_REQUESTS, prompt_len, vocab, seed=99)
    engine = submit(llm, prompts, PROFILE_DECODE, tag="profile")
    started: set[str] = set()
    phases: dict[str, Any] = {}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0, steps = time.perf_counter(), 0
        while len(started) < len(prompts) and engine.has_unfinished_requests():
            outs = engine.step()
            started.update(o.request_id for o in outs if o.outputs and o.outputs[0].token_ids)
            steps += 1
        phases["prefill"] = {"steps": steps, "step_s": time.perf_counter() - t0}
    phases["prefill"]["ops"] = _top_ops(prof)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0, steps = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        phases["decode"] = {"steps": steps, "step_s": time.perf_counter() - t0}
    phases["decode"]["ops"] = _top_ops(prof)
    out.write_text(
        json.dumps(
            {
                "requests": PROFILE_REQUESTS,
                "prompt_len": prompt_len,
                "output_len": PROFILE_DECODE,
                **phases,
            },
            indent=2,
        )
    )


def op_seconds(phase: dict[str, Any] | None, *names: str) -> float:
    if not phase:
        return 0.0
    return sum(op["self_cpu_s"] for op in phase["ops"] if op["op"] in names)


def top_ops(phase: dict[str, Any] | None, n: int = 6) -> str:
    """The first ``n`` ops by self CPU time, with their share of the phase's profiled time."""
    if not phase:
        return "not profiled"
    total = sum(op["self_cpu_s"] for op in phase["ops"])
    return "; ".join(
        f"`{op['op']}` {op['self_cpu_s']:.2f} s ({100 * op['self_cpu_s'] / total:.0f}%)"
        for op in phase["ops"][:n]
    )
