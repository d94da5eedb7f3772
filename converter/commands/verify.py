"""``python -m converter verify --src SRC --dst DST --text FILE``: how close a converted model
is to its source: perplexity of both, top-1 agreement and mean KL of next-token distributions,
and with ``--lm-eval-tasks`` lm-evaluation-harness scores of both side by side.
``--write-card`` records the figures in DST's transmla_report.json and model card."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from converter.calibration.text import read_calibration_text
from converter.checkpoint.fingerprint import check_converted_from
from converter.checkpoint.source import load_tokenizer
from converter.commands.errors import run_command
from converter.commands.eval import FP8_BACKENDS, add_kv_cache_options
from converter.commands.options import (
    add_debug_option,
    add_lm_eval_options,
    add_scoring_options,
)
from converter.errors import ConversionError
from converter.measure.lm_eval import require_lm_eval
from converter.measure.lm_eval_compare import compare_lm_eval, comparison_lines
from converter.measure.perplexity import Agreement, agreement, load_model, windows
from transmla_vllm.checkpoint_format import REPORT_FILE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m converter verify", description=__doc__)
    p.add_argument("--src", required=True, help="source model folder")
    p.add_argument("--dst", required=True, help="converted model folder")
    add_scoring_options(p, "UTF-8 text file or folder to score (not the calibration text)")
    add_kv_cache_options(p, which="the converted model (DST)")
    p.add_argument(
        "--write-card",
        action="store_true",
        help="store the figures in DST/transmla_report.json and its README.md",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_lm_eval_options(p)
    add_debug_option(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return run_command(_verify, args)


def _verify(args: argparse.Namespace) -> None:
    if args.write_card and args.kv_cache_dtype != "auto":
        raise ConversionError(
            "--write-card records the checkpoint as stored: run it without --kv-cache-dtype"
        )
    if args.lm_eval_tasks:
        require_lm_eval(args.lm_eval_backend)  # before any forward pass
    note = check_converted_from(Path(args.src), Path(args.dst))  # before any forward pass
    if note:
        print(f"note: {note}", file=sys.stderr)
    result = _agreement(args)
    data = {**asdict(result), "text": Path(args.text).name, "ctx": args.ctx}
    sim = ""
    if args.kv_cache_dtype != "auto":
        data.update(kv_cache_dtype=args.kv_cache_dtype, fp8_backend=args.fp8_backend)
        sim = f" (converted: simulated {args.kv_cache_dtype} cache as {args.fp8_backend} decodes)"
    if args.lm_eval_tasks:  # the checkpoint as stored: lm-eval runs it in vLLM or transformers
        data["lm_eval"] = compare_lm_eval(
            Path(args.src),
            Path(args.dst),
            args.lm_eval_tasks,
            args.lm_eval_backend,
            args.lm_eval_args,
            args.lm_eval_limit,
        )
    if args.write_card:
        record_verification(Path(args.dst), data)
    if args.json:
        print(json.dumps(data))
    else:
        print(
            f"PPL source {result.ppl_source:.4f}, converted {result.ppl_converted:.4f} "
            f"({100 * (result.ppl_converted / result.ppl_source - 1):+.2f}%); top-1 agreement "
            f"{100 * result.top1_agreement:.2f}%; mean KL {result.mean_kl:.4f} nats "
            f"over {result.tokens} tokens{sim}"
        )
        if args.lm_eval_tasks:
            print("\n".join(comparison_lines(data["lm_eval"])))


def _agreement(args: argparse.Namespace) -> Agreement:
    """PPL, top-1 and KL on ``--text``; both models are freed on return (before lm-eval)."""
    tok = load_tokenizer(Path(args.src))
    batch = windows(tok, read_calibration_text(args.text)[0], args.ctx, args.max_tokens)
    fp8_query = FP8_BACKENDS[args.fp8_backend]
    converted = load_model(args.dst, args.kv_cache_dtype, fp8_query)
    return agreement(load_model(args.src), converted, batch)


def record_verification(dst: Path, data: dict) -> None:
    report_path = dst / REPORT_FILE
    if not report_path.is_file():
        raise ConversionError(f"{dst} has no {REPORT_FILE}; is it a converted folder?")
    report = json.loads(report_path.read_text())
    report["verification"] = data
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    from converter.hub.card import refresh_model_card

    refresh_model_card(dst)
