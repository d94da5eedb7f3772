"""Command line and orchestration: prepare the models, run every engine of every pair in its
own process, save the results, write the docs section."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from serve_cpu_lib.common import DOCS, MIB, ROOT, Variant, Workload, log, variants
from serve_cpu_lib.models import (
    plan_requests,
    prepare_smollm2,
    prepare_synthetic,
    served_bytes_per_token,
)
from serve_cpu_lib.report import write_docs
from serve_cpu_lib.stats import summarize
from serve_cpu_lib.worker import run_engine, worker

PAIRS = ("smollm2", "synthetic")


def normalized(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary saved before engines carried their variant (original / converted only)."""
    for res in summary["pairs"].values():
        for key, r in res.items():
            r.setdefault("variant", asdict(Variant(key, key, key)))
            r["workload"].setdefault("dtype", "float32")
    profiles = summary.get("profiles", {})
    summary["profiles"] = {k: p for k, p in profiles.items() if "prefill" in p}
    return summary


def orchestrate(args: argparse.Namespace) -> int:
    started = time.time()
    work = Path(args.workdir).resolve()
    models, results = work / "models", work / "results"
    mode = ("quick" if args.quick else "full") + ("" if args.dtype == "float32" else "-bf16")
    summary_file = results / f"summary-{mode}.json"
    doc = Path(args.docs).resolve()
    if args.report_only:
        write_docs(normalized(json.loads(summary_file.read_text())), doc)
        return 0
    for d in (models, results):
        d.mkdir(parents=True, exist_ok=True)
    chosen = [p.strip() for p in args.pairs.split(",") if p.strip()]
    unknown = set(chosen) - set(PAIRS)
    if unknown or not chosen:
        raise SystemExit(f"--pairs takes {', '.join(PAIRS)}, not {args.pairs!r}")
    specs: dict[str, tuple[Path, Path, int]] = {}
    conversions = []
    if "smollm2" in chosen:
        src, mla, cmd = prepare_smollm2(models)
        specs["SmolLM2-135M"] = (src, mla, args.smollm2_kv_mib * MIB)
        conversions.append(cmd)
    if "synthetic" in chosen:
        src, mla, cmd = prepare_synthetic(
            models, args.synthetic_layers, args.synthetic_intermediate
        )
        name = f"Llama-3-8B attention, {args.synthetic_layers} layers"
        specs[name] = (src, mla, args.synthetic_kv_mib * MIB)
        conversions.append(cmd)
    prep_s = time.time() - started
    log(f"models ready ({prep_s:.0f} s)")
    prompt = 512 if args.quick else args.prompt_len
    out_len = 16 if args.quick else args.output_len
    engines = variants(args.prefill)
    pairs: dict[str, dict[str, Any]] = {}
    workloads: dict[str, Workload] = {}
    profiles: dict[str, Any] = {}
    for i, (name, (src, mla, kv_bytes)) in enumerate(specs.items()):
        if args.quick:
            kv_bytes //= 4
        per_token = [served_bytes_per_token(m, args.dtype) for m in (src, mla)]
        n = plan_requests(kv_bytes, per_token, prompt + out_len)
        if args.max_requests:
            n = min(n, args.max_requests)
        w = Workload(
            name,
            kv_bytes,
            prompt,
            out_len,
            n,
            ttft_reps=1 if args.quick else args.ttft_reps,
            profile=(i == len(specs) - 1) and not args.no_profile,
            dtype=args.dtype,
        )
        workloads[name] = w
        log(f"pair {name}: {n} requests; expected KV bytes/token {per_token}")
        tag = f"{i}-{mode}"
        pairs[name] = {}
        for v in engines:
            model = src if v.model == "original" else mla
            out = results / f"{tag}-{v.key}.json"
            pairs[name][v.key] = run_engine(
                model, w, v, out, results / f"{tag}-{v.key}.log", args.threads
            )
            prof = out.with_suffix(".profile.json")
            if w.profile and prof.is_file():
                profiles[v.key] = json.loads(prof.read_text())
    wall = time.time() - started
    print("\n" + summarize(pairs) + "\n", flush=True)
    log(f"total wall time {wall / 60:.1f} min")
    import vllm

    summary = {
        "command": ("python benchmarks/serve_cpu.py " + shlex.join(sys.argv[1:])).strip(),
        "date": dt.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), no GPU",
        "vllm": vllm.__version__,
        "dtype": args.dtype,
        "threads": args.threads,
        "wall_s": wall,
        "prep_s": prep_s,
        "conversions": conversions,
        "pairs": pairs,
        "profiles": profiles,
        "workloads": {k: asdict(v) for k, v in workloads.items()},
    }
    summary_file.write_text(json.dumps(summary, indent=2))
    if not args.no_docs:
        write_docs(summary, doc)
    return 0


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        return worker(argv[1:])
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "serve_cpu"))
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-requests", type=int, default=0, help="cap on concurrent requests")
    p.add_argument("--smollm2-kv-mib", type=int, default=512)
    p.add_argument("--synthetic-kv-mib", type=int, default=80)
    p.add_argument("--ttft-reps", type=int, default=2)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OpenMP threads per engine, unbound (default 1: robust on a shared "
        "machine); 0 = vLLM's own binding, one thread per core",
    )
    p.add_argument("--synthetic-layers", type=int, default=2)
    p.add_argument("--synthetic-intermediate", type=int, default=2048)
    p.add_argument(
        "--pairs",
        default=",".join(PAIRS),
        help=f"comma-separated pairs to run, of {', '.join(PAIRS)} (default: both)",
    )
    p.add_argument(
        "--prefill",
        choices=("both", "fused", "vllm"),
        default="both",
        help="MLA prefill of the converted engine: both (the plugin's fused one and vLLM's, "
        "two engines side by side, the default), fused (the plugin's) or vllm "
        "(TRANSMLA_CPU_PREFILL=0)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="model dtype of every engine (bfloat16 on a CPU with AMX: the converted engine "
        "runs AMX_MLA, which has its own prefill); its own docs section",
    )
    p.add_argument("--quick", action="store_true", help="short prompts, small caches")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-docs", action="store_true", help="do not touch docs/")
    p.add_argument(
        "--docs",
        default=str(DOCS),
        help="the markdown file whose serve_cpu section is written (the plot goes to img/ "
        "next to it; default docs/benchmarks.md)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the docs section and plot from the last saved results",
    )
    return orchestrate(p.parse_args(argv))
