"""Submitting requests to an in-process vLLM engine and stepping it by hand, timing each step."""

from __future__ import annotations

import statistics
import time
from typing import Any


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab - 1) for _ in range(length)] for _ in range(n)]


def record_schedules(llm: Any) -> list[tuple[int, int]] | None:
    """Wrap the in-process scheduler to log (scheduled tokens, scheduled requests) per step.

    A step whose every request gets exactly one token is pure decode; anything else runs a
    prompt: a new request's prefill or the recomputation of a preempted one (vLLM preempts by
    recompute when a running request needs a block and the cache is full).
    """
    try:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    except AttributeError:
        return None
    records: list[tuple[int, int]] = []
    schedule = scheduler.schedule

    def recorded(*args: Any, **kwargs: Any) -> Any:
        out = schedule(*args, **kwargs)
        records.append((out.total_num_scheduled_tokens, len(out.num_scheduled_tokens)))
        return out

    scheduler.schedule = recorded
    return records


def submit(llm: Any, prompts: list[list[int]], max_tokens: int, tag: str = "bench") -> Any:
    """Add ``prompts`` (greedy, ignore_eos, ``max_tokens`` each) to the engine; returns it."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", TokensPrompt(prompt_token_ids=ids), params)
    return engine


def step_loop(
    llm: Any,
    prompts: list[list[int]],
    max_tokens: int,
    schedules: list[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Submit all prompts at once and step the engine by hand, timing every step.

    Steps are split into pure decode and prompt steps (see ``record_schedules``): MLA changes
    the first (larger decode batches when more requests fit) and the second runs a different
    prefill kernel, so the two are reported apart as well as end to end.
    """
    start = time.perf_counter()
    engine = submit(llm, prompts, max_tokens)
    first: dict[str, float] = {}
    prefill_s = decode_s = 0.0
    decode_tokens = prefill_steps = 0
    decode_batches: list[int] = []
    decode_steps: list[float] = []
    total = scheduled_total = 0
    while engine.has_unfinished_requests():
        seen = len(schedules) if schedules is not None else 0
        t0 = time.perf_counter()
        outs = engine.step()
        t1 = time.perf_counter()
        new = firsts = 0
        for o in outs:
            n = len(o.outputs[0].token_ids) if o.outputs else 0
            new += n
            if n and o.request_id not in first:
                first[o.request_id] = t1 - start
                firsts += 1
        total += new
        if schedules is not None:
            tokens = sum(t for t, _ in schedules[seen:])
            scheduled_total += tokens
            prompt_step = tokens != sum(r for _, r in schedules[seen:])
        else:
            prompt_step = firsts > 0
        if prompt_step:
            prefill_s += t1 - t0
            prefill_steps += 1
        elif new:
            decode_s += t1 - t0
            decode_tokens += new
            decode_batches.append(new)
            decode_steps.append(t1 - t0)
    wall = time.perf_counter() - start
    ttft = sorted(first.values())
    return {
        "requests": len(prompts),
        "wall_s": wall,
        "output_tokens": total,
        "output_tok_s": total / wall,
        "total_tok_s": (total + sum(map(len, prompts))) / wall,
        "ttft_median_s": statistics.median(ttft) if ttft else None,
        "ttft_max_s": ttft[-1] if ttft else None,
        "prefill_step_s": prefill_s,
        "prefill_steps": prefill_steps,
        "decode_step_s": decode_s,
        "decode_steps": len(decode_steps),
        "decode_tok_s": decode_tokens / decode_s if decode_s else None,
        "decode_step_median_s": statistics.median(decode_steps) if decode_steps else None,
        "decode_batch_mean": statistics.mean(decode_batches) if decode_batches else None,
        "decode_batch_max": max(decode_batches) if decode_batches else None,
        "decode_step_times_s": [round(t, 4) for t in decode_steps],
        # prompt tokens run again after preemption (0 when every request kept its blocks)
        "recomputed_tokens": (
            scheduled_total - sum(len(p) + max_tokens - 1 for p in prompts)
            if schedules is not None
            else None
        ),
    }
