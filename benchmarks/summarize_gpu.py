"""Summarise ``benchmarks/serve_gpu.sh`` results into one markdown table.

Reads ``OUT/{original,converted}-{length}.json`` (written by ``vllm bench serve
--save-result``) and the KV cache size each server logged in ``OUT/{label}-server.log``
("GPU KV cache size: N tokens"). Usage: ``python benchmarks/summarize_gpu.py OUT``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

LABELS = ("original", "converted")
KV_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")


def kv_tokens(log: Path) -> int | None:
    """Tokens the server's KV cache holds, from vLLM's own startup line."""
    if not log.is_file():
        return None
    match = KV_LINE.search(log.read_text(errors="replace"))
    return int(match.group(1).replace(",", "")) if match else None


def load_results(out: Path) -> dict[int, dict[str, dict[str, Any]]]:
    """{length: {label: result}} for every saved bench result."""
    found: dict[int, dict[str, dict[str, Any]]] = {}
    for path in out.glob("*-*.json"):
        label, _, length = path.stem.rpartition("-")
        if label in LABELS and length.isdigit():
            found.setdefault(int(length), {})[label] = json.loads(path.read_text())
    return dict(sorted(found.items()))


def _num(x: Any, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _ratio(o: Any, c: Any) -> str:
    return "n/a" if not o or c is None else f"{c / o:.2f}x"


def summarize(out: Path) -> str:
    kv = {label: kv_tokens(out / f"{label}-server.log") for label in LABELS}
    lines = [
        f"KV cache (vLLM's log): original {_num(kv['original'], ',')} tokens, converted "
        f"{_num(kv['converted'], ',')} tokens ({_ratio(kv['original'], kv['converted'])}).",
        "",
        "| input = output | prompts | output tok/s original | converted | ratio | "
        "median TTFT ms original | converted | median TPOT ms original | converted | "
        "completed original / converted |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for length, res in load_results(out).items():
        o, c = res.get("original", {}), res.get("converted", {})
        lines.append(
            f"| {length} | {o.get('num_prompts', c.get('num_prompts', 'n/a'))} | "
            f"{_num(o.get('output_throughput'), '.1f')} | "
            f"{_num(c.get('output_throughput'), '.1f')} | "
            f"{_ratio(o.get('output_throughput'), c.get('output_throughput'))} | "
            f"{_num(o.get('median_ttft_ms'), '.0f')} | {_num(c.get('median_ttft_ms'), '.0f')} | "
            f"{_num(o.get('median_tpot_ms'), '.1f')} | {_num(c.get('median_tpot_ms'), '.1f')} | "
            f"{o.get('completed', 'n/a')} / {c.get('completed', 'n/a')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", help="the OUT_DIR given to serve_gpu.sh")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        print(f"error: {out} is not a folder", file=sys.stderr)
        return 2
    print(summarize(out), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
