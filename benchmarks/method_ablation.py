"""Which parts of our method help: every method at one size, on SmolLM2 + Shakespeare.

    python benchmarks/method_ablation.py --rope 64 --rank 128 --calib-samples 32 \\
        --eval-tokens 8192

Same data as benchmarks/quality.py (calibrate on comedies, perplexity on tragedies, fp32), but a
fixed rope dim and rank and all methods of converter/methods.py side by side. Writes the
"method_ablation" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.quality import plays  # noqa: E402
from benchmarks.report import publish  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "quality"))
    p.add_argument("--rope", type=int, default=64)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--methods", default="transmla,refit,sequential,sequential-refit,"
                                        "sequential-global")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    from converter.calibration.text import read_calibration_text
    from converter.checkpoint.source import load_tokenizer
    from converter.conversion.pipeline import ConvertOptions, convert
    from converter.measure.perplexity import load_model, perplexity, windows
    from converter.sources.bundled import materialize_smollm2

    work = Path(args.workdir)
    src = materialize_smollm2(work / "SmolLM2-135M-Instruct")
    batch = windows(load_tokenizer(src), read_calibration_text(plays("tragedies"))[0], 512,
                    args.eval_tokens)
    tokens = batch.shape[0] * (batch.shape[1] - 1)
    ppl_src = perplexity(load_model(src), batch)
    rows = []
    for method in args.methods.split(","):
        dst = convert(ConvertOptions(
            src=str(src), dst=str(work / f"ablation-{method}"), rope_dim=args.rope,
            kv_lora_rank=args.rank, calib_text=str(plays("comedies")),
            calib_samples=args.calib_samples, method=method, overwrite=True, dtype="float32"))
        seconds = json.loads((dst / "transmla_report.json").read_text())["seconds"]
        rows.append((method, perplexity(load_model(dst), batch), seconds))
        print(rows[-1], flush=True)
    base = next((ppl for m, ppl, _ in rows if m == "transmla"), None)
    lines = [
        "## Method ablation (SmolLM2-135M-Instruct, CPU)",
        "",
        f"Command: `python benchmarks/method_ablation.py --rope {args.rope} --rank {args.rank} "
        f"--calib-samples {args.calib_samples} --eval-tokens {args.eval_tokens} --methods "
        f"{args.methods}` ({time.strftime('%Y-%m-%d')}, 2 CPU cores shared with other jobs, so "
        "times are indicative).",
        "",
        f"Rope {args.rope} + latent {args.rank} = {args.rope + args.rank} KV elements (source "
        f"384). Perplexity on {tokens} tragedy tokens; source **{ppl_src:.3f}**.",
        "",
        "| method | PPL | increase over source | vs transmla's increase | convert s |",
        "|---|---|---|---|---|",
    ]
    for method, ppl, seconds in rows:
        rel = (ppl - ppl_src) / (base - ppl_src) if base and base > ppl_src else float("nan")
        lines.append(f"| {method} | {ppl:.3f} | {ppl - ppl_src:+.3f} | {rel:.3f} | "
                     f"{seconds:.0f} |")
    publish("method_ablation", lines, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
