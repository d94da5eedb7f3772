"""Where the perplexity lost at a KV budget comes from: partial RoPE or the latent compression.

    python benchmarks/loss_sources.py --budgets 128,192,320 --calib-samples 64 \\
        --eval-tokens 10240 --ctx 512

Same data and evaluation as benchmarks/quality.py (SmolLM2-135M-Instruct; calibrate on the
comedies, perplexity on the tragedies, fp32). For each budget (KV elements per token per layer)
the converter's own split into rope dim r and latent rank rho is converted three ways:

* the budget: rope r, rank rho (what a user gets);
* partial RoPE only: rope r, full rank 2L - r (nothing of [K_nope; V] dropped);
* latent only: rope = head_dim (RoRoPE exact), rank rho.

Rows with the same (rope, rank) are converted once; every PPL is kept in WORKDIR/loss_sources.json
(per method and protocol) and reused by later runs. Writes the "loss_sources" section of
docs/benchmarks.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from transmla_testing.tragedies import add_common_args, tragedies
from transmla_vllm.checkpoint_format import REPORT_FILE

ROOT = Path(__file__).resolve().parent.parent


def convert(
    src: Path, dst: Path, rope: int, rank: int, method: str, fold: str, samples: int, log: Path
) -> float:
    """Convert with ``python -m converter``; return its conversion seconds."""
    from transmla_testing.conversions import comedies_convert_cmd

    flags = ["--rope-dim", str(rope), "--kv-lora-rank", str(rank), "--method", method]
    cmd = comedies_convert_cmd(src, dst, samples, *flags, "--freqfold", fold)
    print("$", shlex.join(cmd[1:]), flush=True)
    with log.open("w") as out:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    return json.loads((dst / REPORT_FILE).read_text())["seconds"]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(p, ROOT / ".cache" / "quality", "128,192,320", 10240)
    p.add_argument("--method", default="refit", help="conversion method of every row")
    args = p.parse_args()

    from converter.checkpoint.source import read_config
    from converter.conversion.settings import resolve_settings
    from converter.math.kv_pca import max_rank
    from converter.measure.perplexity import load_model, perplexity
    from converter.sources.base import inspect_source
    from transmla_testing.report import publish

    started = time.time()
    setup = tragedies(args)
    work, src, batch, tokens = setup.work, setup.src, setup.batch, setup.tokens
    spec = inspect_source(read_config(src))
    # PPLs of earlier runs with the same protocol are reused (one conversion + PPL is minutes)
    cache = work / "loss_sources.json"
    protocol = f"{args.method}/{args.calib_samples}/{args.eval_tokens}/{args.ctx}"
    scored = json.loads(cache.read_text()).get(protocol, {}) if cache.exists() else {}

    def remember(key: str, value: float) -> float:
        scored[key] = value
        stored = json.loads(cache.read_text()) if cache.exists() else {}
        cache.write_text(json.dumps({**stored, protocol: scored}, indent=2))
        return value

    ppl_src = setup.source_ppl

    def ppl(rope: int, rank: int) -> float:
        key = f"{rope}+{rank}"
        if key not in scored:
            dst = work / f"loss-{args.method}-r{rope}-k{rank}"
            log = work / f"loss-{args.method}-r{rope}-k{rank}.log"
            convert(src, dst, rope, rank, args.method, "auto", args.calib_samples, log)
            remember(key, perplexity(load_model(dst), batch))
            print(f"rope {rope} rank {rank}: PPL {scored[key]:.3f}", flush=True)
        return scored[key]

    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        s = resolve_settings(spec, None, None, "auto", "float32", kv_elements=budget, target="hf")
        r, rho, d = s.rope_dim, s.kv_lora_rank, spec.head_dim
        full = max_rank(spec.kv_width, r)
        rows.append((budget, (r, rho, ppl(r, rho)), (r, full, ppl(r, full)), (d, rho, ppl(d, rho))))

    def cell(rope: int, rank: int, value: float) -> str:
        return f"{value:.3f} (+{value - ppl_src:.3f}; {rope} + {rank})"

    lines = [
        "## Where the loss comes from: partial RoPE vs latent compression (SmolLM2-135M, CPU)",
        "",
        f"Command: `python benchmarks/loss_sources.py --budgets {args.budgets} --calib-samples "
        f"{args.calib_samples} --eval-tokens {args.eval_tokens} --ctx {args.ctx} --method "
        f"{args.method}` ({time.strftime('%Y-%m-%d')}, 2 CPU cores, "
        f"{time.time() - started:.0f} s).",
        "",
        f"Every conversion: `--method {args.method} --freqfold auto`, calibration on the "
        f"comedies ({args.calib_samples} x 256 tokens); PPL on the tragedies ({tokens} tokens, "
        f"windows of {args.ctx}, fp32). Source PPL **{ppl_src:.3f}**. Cells: PPL (increase over "
        "the source; rope + rank).",
        "",
        "| KV elements | budget (rope r + rank rho) | partial RoPE only (r + full rank) "
        "| latent only (rope = head_dim + rho) | share of the increase: RoPE / latent |",
        "|---|---|---|---|---|",
    ]
    for budget, both, rope_only, latent_only in rows:
        inc_r, inc_l = rope_only[2] - ppl_src, latent_only[2] - ppl_src
        total = max(inc_r, 0) + max(inc_l, 0)
        share = (
            f"{100 * max(inc_r, 0) / total:.0f}% / {100 * max(inc_l, 0) / total:.0f}%"
            if total > 0
            else "-"
        )
        lines.append(
            f"| {budget} | {cell(*both)} | {cell(*rope_only)} | {cell(*latent_only)} | {share} |"
        )
    lines += [
        "",
        "The two single-cause rows do not add up exactly to the budget row (the losses interact); "
        "the share column splits the sum of the single-cause increases.",
    ]
    publish("loss_sources", lines, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
