"""One engine in its own process (``serve_cpu.py worker``): measure, write JSON; and how the
orchestrator starts it."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from serve_cpu_lib.common import ENTRY, ROOT, Variant, Workload, log
from serve_cpu_lib.engine_loop import random_prompts, record_schedules, step_loop
from serve_cpu_lib.profile import profile_run


def engine_kv_info(llm: Any) -> dict[str, Any]:
    """Capacity as vLLM sized it: the scheduler's block count times the block size."""
    cfg = llm.llm_engine.vllm_config
    cache = cfg.cache_config
    info: dict[str, Any] = {
        "num_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "kv_cache_tokens": cache.num_gpu_blocks * cache.block_size,
        "vllm_kv_cache_size_tokens": getattr(cache, "kv_cache_size_tokens", None),
        "use_mla": cfg.model_config.use_mla,
        "head_size": cfg.model_config.get_head_size(),
        "architecture": cfg.model_config.architectures[0],
        "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
        "max_num_seqs": cfg.scheduler_config.max_num_seqs,
        "chunked_prefill": cfg.scheduler_config.enable_chunked_prefill,
        "prefix_caching": cache.enable_prefix_caching,
    }
    try:  # in-process engine core: read the page size of the KV spec (bytes per block)
        core = llm.llm_engine.engine_core.engine_core
        kv_config = core.scheduler.kv_cache_config
        spec = kv_config.kv_cache_groups[0].kv_cache_spec
        layers = sum(len(g.layer_names) for g in kv_config.kv_cache_groups)
        info["kv_bytes_per_token"] = spec.page_size_bytes * layers // spec.block_size
        info["kv_layers"] = layers
    except AttributeError:
        pass
    return info


def mla_backends(llm: Any) -> dict[str, Any]:
    """The MLA decode and prefill backends the engine serves with (the plugin's plan), and how
    often this process ran the plugin's fused CPU prefill (the engine runs in-process)."""
    from transmla_vllm.cpu_prefill import CALLS
    from transmla_vllm.serve_plan import served_plan

    cfg = llm.llm_engine.vllm_config
    plan = served_plan(cfg.model_config.hf_text_config) if cfg.model_config.use_mla else None
    if plan is None:
        return {}
    return {
        "mla_decode_backend": plan.decode_backend,
        "mla_prefill_backend": plan.prefill_backend,
        "fused_prefill_calls": CALLS["fused"],
        "fallback_prefill_calls": CALLS["fallback"],
    }


def worker(argv: list[str]) -> int:
    """Start one engine, measure, write JSON. Runs in its own process (vLLM spawns)."""
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--workload", required=True, help="Workload as JSON")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    w = Workload(**json.loads(args.workload))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from vllm import LLM
    from vllm.config import SchedulerConfig

    max_len = w.prompt_len + w.output_len
    t0 = time.perf_counter()
    # CPU_MLA forces no chunked prefill / no prefix caching and this batch size; give every
    # engine the same so only the attention differs.
    llm = LLM(
        model=args.model,
        dtype=w.dtype,
        enforce_eager=True,
        compilation_config={"custom_ops": ["none"]},
        kv_cache_memory_bytes=w.kv_cache_bytes,
        max_model_len=max_len,
        enable_chunked_prefill=False,
        enable_prefix_caching=False,
        max_num_batched_tokens=max(max_len, SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS),
        seed=0,
        trust_remote_code=True,
    )
    result: dict[str, Any] = {
        "model": args.model,
        "workload": asdict(w),
        "init_s": time.perf_counter() - t0,
        **engine_kv_info(llm),
    }
    log(
        f"{Path(args.model).name}: KV cache {result['kv_cache_tokens']:,} tokens "
        f"({result['num_blocks']} blocks x {result['block_size']}), "
        f"{result.get('kv_bytes_per_token', '?')} B/token, init {result['init_s']:.0f} s"
    )
    vocab = llm.llm_engine.vllm_config.model_config.get_vocab_size()
    schedules = record_schedules(llm)
    result["loadavg_start"] = os.getloadavg()[0]

    step_loop(llm, random_prompts(1, 32, vocab, seed=1), 4)  # warm-up
    ttft = [
        step_loop(llm, random_prompts(1, w.prompt_len, vocab, seed=10 + i), 1)["wall_s"]
        for i in range(w.ttft_reps)
    ]
    result["ttft_single_s"] = statistics.median(ttft)
    result["ttft_single_all_s"] = ttft
    log(f"  TTFT alone ({w.prompt_len} prompt tokens): {result['ttft_single_s']:.2f} s")

    load = step_loop(
        llm, random_prompts(w.num_requests, w.prompt_len, vocab, seed=1000), w.output_len, schedules
    )
    result["load"] = load
    log(
        f"  load: {w.num_requests} x ({w.prompt_len} + {w.output_len}) in {load['wall_s']:.1f} s"
        f" -> {load['output_tok_s']:.2f} output tok/s; decode {load['decode_tok_s'] or 0:.1f} "
        f"tok/s at mean batch {load['decode_batch_mean'] or 0:.1f}; prefill steps "
        f"{load['prefill_step_s']:.1f} s, decode steps {load['decode_step_s']:.1f} s, "
        f"recomputed after preemption {load['recomputed_tokens']} tokens"
    )
    if w.profile:
        prof_out = Path(args.out).with_suffix(".profile.json")
        t1 = time.perf_counter()
        profile_run(llm, w.prompt_len, vocab, prof_out)
        log(f"  profile -> {prof_out.name} ({time.perf_counter() - t1:.0f} s)")
    result.update(mla_backends(llm))
    if "mla_prefill_backend" in result:
        log(
            f"  MLA {result['mla_decode_backend']} decode, {result['mla_prefill_backend']} "
            f"prefill; fused CPU prefill calls {result['fused_prefill_calls']}"
        )
    result["loadavg_end"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def engine_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """0: vLLM's own binding (one OpenMP thread per core). N: N unbound threads, which
    degrades gracefully when other processes share the cores (bound threads spin at
    every barrier for a descheduled sibling). ``extra``: the variant's own settings."""
    env = dict(os.environ)
    if threads:
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(threads))
    env.update(extra or {})
    return env


def run_engine(
    model: Path, w: Workload, variant: Variant, out: Path, logfile: Path, threads: int = 0
) -> dict[str, Any]:
    cmd = [sys.executable, str(ENTRY), "worker", "--model", str(model)]
    cmd += ["--workload", json.dumps(asdict(w)), "--out", str(out)]
    env = dict(variant.env)
    log(f"engine: {model.name} ({variant.label}{''.join(f', {k}={v}' for k, v in env.items())})")
    with logfile.open("w") as f:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=f,
            text=True,
            env=engine_env(threads, env),
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            print("    " + line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"engine for {model} failed (status {proc.returncode}); see {logfile}")
    return {**json.loads(out.read_text()), "variant": asdict(variant)}
