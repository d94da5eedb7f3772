"""Where the perplexity lost at a KV budget comes from: partial RoPE or the latent compression.

    python benchmarks/loss_sources.py --budgets 128,192 --methods refit,refit-recon

Same data and evaluation as benchmarks/quality.py (SmolLM2-135M-Instruct; calibrate on the
comedies, perplexity on the tragedies, fp32). For each method and budget (KV elements per token
per layer) the converter's own split into rope dim r and latent rank rho is converted three
ways:

* the budget: rope r, rank rho (what a user gets);
* partial RoPE only: rope r, full rank 2L - r (nothing of [K_nope; V] dropped);
* latent only: rope = head_dim (RoRoPE exact), rank rho.

Rows with the same (method, rope, rank) are converted once; every PPL is kept in
WORKDIR/loss_sources.json (per method and protocol) and reused by later runs. Comparing
`refit` with `refit-recon` shows which of the two losses the layer-wise stage reduces. Writes
the "loss_sources" section of docs/benchmarks.md (unless --no-write).
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
    add_common_args(p, ROOT / ".cache" / "quality", "128,192", 10240)
    p.add_argument(
        "--methods", default="refit,refit-recon", help="conversion methods (comma-separated)"
    )
    args = p.parse_args()

    from converter.checkpoint.source import read_config
    from converter.conversion.settings import resolve_settings
    from converter.math.kv_pca import max_rank
    from converter.measure.perplexity import load_model, perplexity
    from converter.sources.inspection import inspect_source
    from transmla_testing.report import publish

    started = time.time()
    setup = tragedies(args)
    work, src, batch, tokens = setup.work, setup.src, setup.batch, setup.tokens
    spec = inspect_source(read_config(src))
    # PPLs of earlier runs with the same protocol are reused (one conversion + PPL is minutes)
    cache = work / "loss_sources.json"
    methods = args.methods.split(",")
    protocols = {m: f"{m}/{args.calib_samples}/{args.eval_tokens}/{args.ctx}" for m in methods}
    stored = json.loads(cache.read_text()) if cache.exists() else {}
    scored = {m: stored.get(protocols[m], {}) for m in methods}
    ppl_src = setup.source_ppl

    def ppl(method: str, rope: int, rank: int) -> float:
        key = f"{rope}+{rank}"
        if key not in scored[method]:
            name = f"loss-{method}-r{rope}-k{rank}"
            dst, log = work / name, work / f"{name}.log"
            convert(src, dst, rope, rank, method, "auto", args.calib_samples, log)
            scored[method][key] = perplexity(load_model(dst), batch)
            print(f"{method} rope {rope} rank {rank}: PPL {scored[method][key]:.3f}", flush=True)
            on_disk = json.loads(cache.read_text()) if cache.exists() else {}
            on_disk[protocols[method]] = scored[method]
            cache.write_text(json.dumps(on_disk, indent=2))
        return scored[method][key]

    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        s = resolve_settings(spec, None, None, "auto", "float32", kv_elements=budget, target="hf")
        r, rho, d = s.rope_dim, s.kv_lora_rank, spec.head_dim
        full = max_rank(spec.kv_width, r)
        for m in methods:
            cells = [(r, rho), (r, full), (d, rho)]
            rows.append((budget, m, *((a, b, ppl(m, a, b)) for a, b in cells)))

    def cell(rope: int, rank: int, value: float) -> str:
        return f"{value:.3f} (+{value - ppl_src:.3f}; {rope} + {rank})"

    lines = [
        "## Where the loss comes from: partial RoPE vs latent compression (SmolLM2-135M, CPU)",
        "",
        f"Command: `python benchmarks/loss_sources.py --budgets {args.budgets} --methods "
        f"{args.methods} --calib-samples {args.calib_samples} --eval-tokens {args.eval_tokens} "
        f"--ctx {args.ctx}` ({time.strftime('%Y-%m-%d')}, 2 CPU cores, "
        f"{time.time() - started:.0f} s; PPLs measured by earlier runs of the same protocol "
        f"are reused from {cache.name}).",
        "",
        f"Every conversion: `--freqfold auto`, calibration on the comedies ({args.calib_samples} "
        f"x 256 tokens); PPL on the tragedies ({tokens} tokens, windows of {args.ctx}, fp32). "
        f"Source PPL **{ppl_src:.3f}**. Cells: PPL (increase over the source; rope + rank).",
        "",
        "| KV elements | method | budget (rope r + rank rho) | partial RoPE only (r + full "
        "rank) | latent only (rope = head_dim + rho) | share of the increase: RoPE / latent |",
        "|---|---|---|---|---|---|",
    ]
    for budget, method, both, rope_only, latent_only in rows:
        inc_r, inc_l = rope_only[2] - ppl_src, latent_only[2] - ppl_src
        total = max(inc_r, 0) + max(inc_l, 0)
        share = (
            f"{100 * max(inc_r, 0) / total:.0f}% / {100 * max(inc_l, 0) / total:.0f}%"
            if total > 0
            else "-"
        )
        lines.append(
            f"| {budget} | {method} | {cell(*both)} | {cell(*rope_only)} | {cell(*latent_only)} "
            f"| {share} |"
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
