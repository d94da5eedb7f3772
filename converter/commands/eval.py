"""``python -m converter eval --model DIR --text FILE``: perplexity of a source or converted
model folder in transformers (fp32)."""

from __future__ import annotations

import argparse
import json

import torch

from converter.calibration.text import read_calibration_text
from converter.checkpoint.source import load_tokenizer
from converter.measure.perplexity import load_model, perplexity, windows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m converter eval", description=__doc__)
    p.add_argument("--model", required=True, help="model folder (source or converted)")
    p.add_argument("--text", required=True, help="UTF-8 text file or folder to score")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (512)")
    p.add_argument("--max-tokens", type=int, default=20480, help="tokens scored (20480)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from pathlib import Path

    tok = load_tokenizer(Path(args.model))
    batch = windows(tok, read_calibration_text(args.text)[0], args.ctx, args.max_tokens)
    ppl = perplexity(load_model(args.model), batch)
    result = {
        "model": args.model,
        "ppl": ppl,
        "tokens": int(batch.shape[0] * (batch.shape[1] - 1)),
        "ctx": args.ctx,
    }
    print(
        json.dumps(result)
        if args.json
        else f"perplexity {ppl:.4f} over {result['tokens']} tokens (ctx {args.ctx})"
    )
    return 0
