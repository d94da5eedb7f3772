"""Which parts of our method help: every method at one size, on SmolLM2 + Shakespeare.

    python benchmarks/method_ablation.py --rope 64 --rank 128 --calib-samples 64 \\
        --eval-tokens 10240 --ctx 512

Same data and evaluation as benchmarks/quality.py (calibrate on the comedies, perplexity on the
tragedies, fp32), but a fixed rope dim and rank and the methods of
converter/conversion/methods.py side by side. Every row pins --freqfold, so a change of the
converter's FreqFold default cannot change what a row measures:

* METHOD:smallest -- the smallest valid FreqFold for head_dim and --rope (the published
  method's hand-picked value), passed to the converter as that integer;
* METHOD:auto -- chosen per layer on held-out calibration chunks (--freqfold auto);
* METHOD:N -- that integer.

The default rows compare every method at the published FreqFold, plus refit and the converter's
default method (refit-recon) at the default FreqFold (auto). Each conversion runs
`python -m converter` in its own process; its log goes to WORKDIR/ablation-ROW.log. Writes the
"method_ablation" section of docs/benchmarks.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from transmla_vllm.checkpoint_format import CONFIG_FILE, REPORT_FILE

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_ROWS = (
    "transmla:smallest,refit:smallest,sequential:smallest,sequential-refit:smallest,"
    "sequential-global:smallest,refit-recon:smallest,refit:auto,refit-recon:auto"
)


def parse_rows(text: str) -> list[tuple[str, str]]:
    """'METHOD:FREQFOLD,...' -> [(method, freqfold)]; a row without a FreqFold is refused."""
    rows = []
    for item in text.split(","):
        method, sep, fold = item.strip().partition(":")
        if not sep or not method or not (fold in ("auto", "smallest") or fold.isdigit()):
            raise argparse.ArgumentTypeError(
                f"row {item!r}: write METHOD:FREQFOLD with FREQFOLD auto, smallest or an "
                "integer (every row pins its FreqFold)"
            )
        rows.append((method, fold))
    return rows


def head_dim(src: Path) -> int:
    cfg = json.loads((src / CONFIG_FILE).read_text())
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def folds_used(report: dict) -> str:
    """The FreqFold each layer used, from transmla_report.json: '1 (30 layers)'."""
    counts = Counter(layer["freqfold"] for layer in report["layers"])
    return ", ".join(f"{f} ({n} layer{'s' if n > 1 else ''})" for f, n in sorted(counts.items()))


def convert_cmd(
    src: Path, dst: Path, method: str, fold: str, args: argparse.Namespace, comedies: Path
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "converter",
        "--src",
        str(src),
        "--dst",
        str(dst),
        "--rope-dim",
        str(args.rope),
        "--kv-lora-rank",
        str(args.rank),
        "--method",
        method,
        "--freqfold",
        fold,
        "--calib-text",
        str(comedies),
        "--calib-samples",
        str(args.calib_samples),
        "--dtype",
        "float32",
        "--overwrite",
    ]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "quality"))
    p.add_argument("--rope", type=int, default=64, help="--rope-dim of every row (default 64)")
    p.add_argument(
        "--rank", type=int, default=128, help="--kv-lora-rank of every row (default 128)"
    )
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-tokens", type=int, default=10240)
    p.add_argument("--ctx", type=int, default=512, help="evaluation window (default 512)")
    p.add_argument(
        "--rows",
        type=parse_rows,
        default=parse_rows(DEFAULT_ROWS),
        help=f"METHOD:FREQFOLD,... (default {DEFAULT_ROWS})",
    )
    p.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = p.parse_args()

    import torch

    from converter.calibration.text import read_calibration_text
    from converter.checkpoint.source import load_tokenizer
    from converter.conversion.methods import DEFAULT_METHOD, METHODS
    from converter.conversion.pipeline import ConvertOptions
    from converter.math.rorope import default_freqfold
    from converter.measure.perplexity import load_model, perplexity, windows
    from converter.sources.bundled import materialize_smollm2
    from transmla_testing.report import publish
    from transmla_testing.text import plays

    unknown = sorted({m for m, _ in args.rows} - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; one of {', '.join(METHODS)}")
    default_fold = next(
        f.default for f in dataclasses.fields(ConvertOptions) if f.name == "freqfold"
    )
    default_fold = "auto" if default_fold in (None, "auto") else str(default_fold)

    torch.manual_seed(0)
    started, load_start = time.time(), os.getloadavg()[0]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = materialize_smollm2(work / "SmolLM2-135M-Instruct")
    smallest = default_freqfold(head_dim(src), args.rope)
    batch = windows(
        load_tokenizer(src),
        read_calibration_text(plays("tragedies"))[0],
        args.ctx,
        args.eval_tokens,
    )
    tokens = batch.shape[0] * (batch.shape[1] - 1)
    ppl_src = perplexity(load_model(src), batch)
    print(f"source PPL {ppl_src:.3f} over {tokens} tokens", flush=True)

    rows = []
    for method, fold in args.rows:
        flag = str(smallest) if fold == "smallest" else fold
        name = f"{method}-{flag}"
        dst = work / f"ablation-{name}"
        cmd = convert_cmd(src, dst, method, flag, args, plays("comedies"))
        print("$", shlex.join(cmd[1:]), flush=True)
        with (work / f"ablation-{name}.log").open("w") as log:
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        report = json.loads((dst / REPORT_FILE).read_text())
        held_out = (
            json.loads((dst / CONFIG_FILE).read_text())
            .get("transmla", {})
            .get("calibration", {})
            .get("held_out_chunks", 0)
        )
        roles = []
        if method == "transmla" and fold == "smallest":
            roles.append("the published method")
        if method == DEFAULT_METHOD and fold == default_fold:
            roles.append("the converter's default")
        rows.append(
            {
                "method": method,
                "fold": fold,
                "flag": flag,
                "used": folds_used(report),
                "roles": roles,
                "held_out": held_out,
                "seconds": report["seconds"],
                "ppl": perplexity(load_model(dst), batch),
            }
        )
        print(
            f"{method} --freqfold {flag}: PPL {rows[-1]['ppl']:.3f} (convert "
            f"{report['seconds']:.0f} s)",
            flush=True,
        )
    cfg = json.loads((src / CONFIG_FILE).read_text())
    data = {
        "command": (
            f"python benchmarks/method_ablation.py --rope {args.rope} --rank {args.rank} "
            f"--calib-samples {args.calib_samples} --eval-tokens {args.eval_tokens} "
            f"--ctx {args.ctx} --rows " + ",".join(f"{m}:{f}" for m, f in args.rows)
        ),
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "wall_s": time.time() - started,
        "load_start": load_start,
        "rope": args.rope,
        "rank": args.rank,
        "calib_samples": args.calib_samples,
        "ctx": args.ctx,
        "windows": int(batch.shape[0]),
        "tokens": tokens,
        "head_dim": head_dim(src),
        "smallest": smallest,
        "source_elements": 2 * int(cfg["num_key_value_heads"]) * head_dim(src),
        "source_ppl": ppl_src,
        "rows": rows,
        "row_command": shlex.join(
            [
                "python",
                *convert_cmd(
                    Path(os.path.relpath(src, ROOT)),
                    Path(os.path.relpath(work, ROOT)) / "ablation-METHOD-F",
                    "METHOD",
                    "F",
                    args,
                    Path(os.path.relpath(plays("comedies"), ROOT)),
                )[1:],
            ]
        ),
    }
    (work / "ablation-results.json").write_text(json.dumps(data, indent=2))
    publish("method_ablation", section(data), write=not args.no_write)
    return 0


def section(d: dict) -> list[str]:
    """The docs/benchmarks.md section; every sentence is computed from ``d``."""
    rows, ppl_src = d["rows"], d["source_ppl"]
    base = next(
        (r for r in rows if r["method"] == "transmla" and r["fold"] == "smallest"),
        next((r for r in rows if r["method"] == "transmla"), None),
    )
    base_inc = base["ppl"] - ppl_src if base else float("nan")

    def rel(r: dict) -> float:
        return (r["ppl"] - ppl_src) / base_inc if base and base_inc > 0 else float("nan")

    held = sorted({r["held_out"] for r in rows if r["held_out"]})
    lines = [
        "## Method ablation (SmolLM2-135M-Instruct, CPU)",
        "",
        f"Command: `{d['command']}` ({d['date']}, {d['cpus']} CPU cores, {d['wall_s']:.0f} s in "
        f"all; 1-minute load average {d['load_start']:.1f} at the start: conversion times are "
        "only as steady as the machine was).",
        "",
        f"Each row: `{d['row_command']}`, with METHOD and F pinned per row (`smallest` = "
        f"{d['smallest']}, the smallest valid FreqFold for head_dim {d['head_dim']} and rope "
        f"{d['rope']}, the published method's choice; `auto` = chosen per layer on held-out "
        "calibration chunks"
        + (f", {' / '.join(map(str, held))} of the {d['calib_samples']} held out" if held else "")
        + ").",
        "",
        f"Rope {d['rope']} + latent {d['rank']} = {d['rope'] + d['rank']} KV elements (source "
        f"{d['source_elements']}). Perplexity on {d['tokens']} tragedy tokens ({d['windows']} "
        f"windows of {d['ctx']}), fp32; source **{ppl_src:.3f}**.",
        "",
        "| method | --freqfold | FreqFold used | PPL | increase over source | vs transmla's "
        "increase | convert s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = r["method"] + (f" ({', '.join(r['roles'])})" if r["roles"] else "")
        fold = f"{r['flag']} (smallest)" if r["fold"] == "smallest" else r["flag"]
        lines.append(
            f"| {label} | {fold} | {r['used']} | {r['ppl']:.3f} | "
            f"{r['ppl'] - ppl_src:+.3f} | {rel(r):.3f} | {r['seconds']:.0f} |"
        )
    lines.append("")
    if base:
        lines.append(
            f'"vs transmla\'s increase" = (PPL - source PPL) / (PPL of `transmla '
            f"--freqfold {base['flag']}` - source PPL)."
        )
        same = [r for r in rows if r["flag"] == base["flag"] and r is not base]
        if same:
            parts = [
                f"{r['method']} {'removes' if rel(r) <= 1 else 'adds'} "
                f"{100 * abs(1 - rel(r)):.0f}% {'of' if rel(r) <= 1 else 'to'} it"
                for r in same
            ]
            lines.append(
                f"- At FreqFold {base['flag']}, relative to transmla's increase: "
                + "; ".join(parts)
                + "."
            )
    best = min(rows, key=lambda r: r["ppl"])
    lines.append(
        f"- Lowest PPL: {best['method']} `--freqfold {best['flag']}`, {best['ppl']:.3f} "
        f"({100 * (best['ppl'] / ppl_src - 1):+.1f}% from the source)."
    )
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        for a, b in zip(mine, mine[1:], strict=False):
            lower, higher = sorted((a, b), key=lambda r: r["ppl"])
            lines.append(
                f"- {method}: `--freqfold {lower['flag']}` gives PPL {lower['ppl']:.3f}"
                f", `--freqfold {higher['flag']}` {higher['ppl']:.3f} ("
                f"{100 * (higher['ppl'] / lower['ppl'] - 1):.1f}% higher)."
            )
    return lines


if __name__ == "__main__":
    sys.exit(main())
