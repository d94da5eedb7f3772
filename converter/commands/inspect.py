"""``python -m converter inspect DIR``: KV cache bytes per token and what fits in a memory budget,
original GQA vs converted MLA (checkpoint size and as each vLLM backend would serve it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from converter.commands.errors import run_command
from converter.commands.options import add_debug_option
from converter.measure.kv_cache import DTYPE_BYTES, format_table, kv_budget, parse_memory

EPILOG = """\
For a source folder (LLaMA / Qwen2 / Mistral) the converted rows preview a conversion with
--rope-dim / --kv-lora-rank (the converter's defaults). For a converted folder the original is
the source geometry recorded in its transmla block. Capacity ignores vLLM's rounding to whole
blocks and the memory of weights and activations: --kv-memory is the cache alone (what vLLM's
--kv-cache-memory-bytes sets).

examples:
  python -m converter inspect ./llama-mla --dtype bfloat16 --kv-memory 8GiB --context 4096
  python -m converter inspect ./Llama-3.1-8B-Instruct --kv-lora-rank 448 --json
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m converter inspect",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", help="source or converted model folder (with config.json)")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPE_BYTES),
        default=None,
        help="KV cache dtype as served (default: the checkpoint's dtype)",
    )
    p.add_argument(
        "--kv-memory",
        default="8GiB",
        help="KV cache budget, e.g. 8GiB, 512MiB, 10GB or bytes (default 8GiB)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=4096,
        help="tokens per request when counting concurrent requests (default 4096)",
    )
    p.add_argument(
        "--rope-dim",
        type=int,
        default=None,
        help="source folders only: rope dims of the previewed conversion",
    )
    p.add_argument(
        "--kv-lora-rank",
        type=int,
        default=512,
        help="source folders only: latent rank of the previewed conversion",
    )
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    add_debug_option(p)
    return p


def main(argv: list[str]) -> int:
    return run_command(_inspect, build_parser().parse_args(argv))


def _inspect(args: argparse.Namespace) -> None:
    budget = kv_budget(
        Path(args.folder),
        dtype=args.dtype,
        kv_memory=parse_memory(args.kv_memory),
        context=args.context,
        rope_dim=args.rope_dim,
        kv_lora_rank=args.kv_lora_rank,
    )
    if args.json:
        print(json.dumps(budget.to_dict(), indent=2))
    else:
        print(format_table(budget), end="")
