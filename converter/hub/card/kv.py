"""The card's KV cache section: per-token cache of the source and the conversion, and what
each vLLM MLA backend pads the cache entry to when it serves the checkpoint. The arithmetic is
``converter.measure.kv_cache``'s (the numbers ``inspect`` prints); this module only words it."""

from __future__ import annotations

from typing import Any

from converter.measure.kv_cache import DTYPE_BYTES, cache_bytes, served_splits
from transmla_vllm.backends import what_serves_it

# The card quotes bytes in bf16 (the usual served dtype) and for one long sequence.
CARD_DTYPE_BYTES = DTYPE_BYTES["bfloat16"]
SEQUENCE_TOKENS = 32768


def _fmt_bytes(n: float) -> str:
    """A byte count as the card prints it (B, KiB, MiB or GiB)."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"


def kv_section(config: dict[str, Any], summary: dict[str, Any]) -> str:
    """The section, from the element counts the conversion recorded; empty without them."""
    per_layer = summary.get("kv_elements_per_token_per_layer") or {}
    before, after = per_layer.get("source"), per_layer.get("converted")
    if not before or not after:
        return ""
    layers = int(config["num_hidden_layers"])

    def size(elements: int, tokens: int = 1) -> int:
        return cache_bytes(elements, layers, CARD_DTYPE_BYTES, tokens)

    reduction = summary.get("kv_reduction", 1 - after / before)
    lines = [
        "## KV cache",
        "",
        "| per token | source (GQA) | converted (MLA) |",
        "|---|---:|---:|",
        f"| elements per layer | {before:,} | {after:,} |",
        f"| bytes, bf16, all {layers} layers | {size(before):,} | {size(after):,} |",
        f"| bf16, 32k-token sequence | {_fmt_bytes(size(before, SEQUENCE_TOKENS))} | "
        f"{_fmt_bytes(size(after, SEQUENCE_TOKENS))} |",
        "",
        f"Reduction: **{100 * reduction:.1f}%** ({before / after:.2f}x less KV cache per token).",
    ]
    rank, rope = int(config["kv_lora_rank"]), int(config["qk_rope_head_dim"])
    served: dict[int | None, list[str]] = {}
    for backend, split in served_splits(rank, rope):
        served.setdefault(sum(split) if split else None, []).append(backend.name)
    if set(served) != {after}:
        where = "; ".join(
            f"{n} on {', '.join(names)}" for n, names in sorted(served.items(), key=str) if n
        )
        lines += [
            "",
            f"vLLM's MLA kernels take only a few cache-entry sizes, so the plugin "
            f"zero-pads this {after}-wide cache entry when loading (exactly, no quality "
            f"change) to what the chosen backend serves: {where} elements per token and "
            "layer.",
        ]
        if None in served:
            lines += ["", f"Not served as MLA by {', '.join(served[None])}: {what_serves_it()}."]
    return "\n".join(lines) + "\n"
