"""One process against two torchrun ranks (gloo, FSDP2) healing the same real conversion.

SmolLM2-135M-Instruct (bundled) converted at ``--budget`` KV elements with the default method on
the comedies, then healed twice with the same global batch and settings: by
``python -m converter heal`` and by ``torchrun --nproc-per-node 2 -m converter heal``. Reported
side by side from one run: the test PPL on the tragedies each heal measures on its written
weights (and ``converter eval`` on the two-rank folder, independently), the largest difference
of any trained weight relative to that tensor's largest entry, the trained bytes and the peak
RSS each rank held, the wall time; then vLLM serves the two-rank folder and its 32 greedy tokens
are compared with transformers'.

    python benchmarks/heal_ranks.py                 # writes the "heal_torchrun" section
    python benchmarks/heal_ranks.py --tokens 8192 --no-write   # a quicker look
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from converter.conversion.methods import DEFAULT_METHOD
from transmla_testing.conversions import heal_args
from transmla_testing.launch import converter_cmd, run_quietly
from transmla_testing.models import read_tensors
from transmla_testing.parity import prompts_for, run_vllm, transformers_greedy
from transmla_testing.report import publish
from transmla_testing.text import plays
from transmla_testing.tragedies import (
    add_common_args,
    converter_eval_ppl,
    default_conversion,
    tragedies,
)
from transmla_vllm.checkpoint_format import REPORT_FILE

ROOT = Path(__file__).resolve().parent.parent
RANKS = 2


def heal_cmd(
    src: Path, student: Path, dst: Path, ranks: int, args: argparse.Namespace
) -> list[str]:
    """The heal, launched as one process or under torchrun with ``ranks``."""
    flags = heal_args(
        src,
        student,
        dst,
        args.tokens,
        plays("comedies"),
        *("--seqlen", str(args.ctx), "--batch-size", str(args.batch_size)),
        *("--precision", "fp32", "--keep-worse", "--overwrite"),
        *("--eval-text", str(plays("tragedies")), "--eval-tokens", str(args.eval_tokens)),
    )
    return converter_cmd(flags, ranks)


def weight_gap(one: Path, two: Path) -> float:
    """The largest |one - two| of any tensor, relative to that tensor's largest entry."""
    a, b = read_tensors(one), read_tensors(two)
    return max(float((a[n] - b[n]).abs().max()) / max(float(a[n].abs().max()), 1e-30) for n in a)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(p, ROOT / ".cache" / "heal", "128", 10240)
    p.add_argument("--tokens", type=int, default=32768, help="heal tokens")
    p.add_argument("--batch-size", type=int, default=8, help="the global batch")
    p.add_argument("--reuse", action="store_true", help="keep a conversion in the work dir")
    args = p.parse_args()
    budget = int(args.budgets.split(",")[0])

    setup = tragedies(args)
    converted = default_conversion(setup, budget, args)
    runs = {}
    for name, ranks in (("one", 1), ("two", RANKS)):  # ranks x threads = the 2 cores
        dst = setup.work / f"smollm2-{budget}-healed-{name}"
        seconds = run_quietly(heal_cmd(setup.src, converted, dst, ranks, args), 2 // ranks)
        heal = json.loads((dst / REPORT_FILE).read_text())["heal"]
        runs[name] = {"dst": dst, "seconds": seconds, "heal": heal}
        print(f"{name}: test PPL {heal['test']['ppl']}, {seconds:.0f} s", flush=True)
    two = runs["two"]["dst"]
    independent = converter_eval_ppl(two, args)
    gap = weight_gap(runs["one"]["dst"], two)
    prompts = prompts_for(two)
    served = run_vllm(two, prompts, setup.work, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    same = [r["tokens"] for r in served["results"]] == [
        w["tokens"] for w in transformers_greedy(two, prompts)
    ]
    publish("heal_torchrun", section(runs, independent, gap, same, args, budget), not args.no_write)
    return 0


def section(
    runs: dict, independent: float, gap: float, same: bool, args: argparse.Namespace, budget: int
) -> list[str]:
    one, two = runs["one"]["heal"], runs["two"]["heal"]
    rel = abs(two["test"]["ppl"]["after"] / one["test"]["ppl"]["after"] - 1)

    def mb(values: list[int]) -> str:
        return " / ".join(f"{v / 1e6:.1f}" for v in values)

    def gb(values: list[int]) -> str:
        return " / ".join(f"{v / 1e9:.2f}" for v in values)

    def ppl(r: dict) -> str:
        return f"{r['test']['ppl']['before']:.4f} -> {r['test']['ppl']['after']:.4f}"

    rows = [
        ("launch", "1 process, 2 threads", f"torchrun, {RANKS} ranks x 1 thread, gloo"),
        ("test PPL before -> after", ppl(one), ppl(two)),
        (
            "trained bytes per rank (MB)",
            *(mb(r["memory"]["trained_bytes_by_rank"]) for r in (one, two)),
        ),
        (
            "peak RSS per rank (GB, VmHWM)",
            *(gb(r["memory"]["peak_bytes_by_rank"]) for r in (one, two)),
        ),
        ("wall time (s)", *(f"{runs[k]['seconds']:.0f}" for k in ("one", "two"))),
    ]
    return [
        f"Command: `python benchmarks/heal_ranks.py --tokens {args.tokens} --batch-size "
        f"{args.batch_size}` (measured). SmolLM2-135M-Instruct converted with "
        f"`{DEFAULT_METHOD}` at {budget} KV elements on the comedies, healed on them for "
        f"{args.tokens} tokens (global batch {args.batch_size} x {args.ctx}, fp32), test rows "
        f"the first {args.eval_tokens} tokens of the tragedies; both heals in one run on this "
        "machine's 2 cores.",
        "",
        "| | one process | two ranks |",
        "|---|---:|---:|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
        f"- test PPL after, two ranks against one: {rel:.2e} relative; `converter eval` on the "
        f"two-rank folder: {independent:.4f}.",
        f"- largest trained-weight difference, relative to the tensor's largest entry: {gap:.1e}.",
        f"- vLLM serves the two-rank folder with the same 32 greedy tokens as transformers: "
        f"{'yes' if same else 'NO'}.",
    ]


if __name__ == "__main__":
    sys.exit(main())
