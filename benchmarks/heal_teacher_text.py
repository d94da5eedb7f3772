"""Heal with no corpus: SmolLM2 trained only on text it writes itself (``--teacher-text``).

SmolLM2-135M-Instruct (bundled) converted with the default method at ``--budgets`` KV elements on
the comedies (the conversion benchmarks/heal.py makes, reused with ``--reuse``), then
``python -m converter heal --teacher-text N --tokens T`` with no --calib-* text: vLLM samples N
tokens of chat documents from the teacher (generic user turns, its chat template), the student
trains on them alone, and the held-out rows are the tragedies (``--eval-text``), real text the
run never trains on. Reported: the test PPL before / after against the teacher's, the share of
the conversion's increase removed, the heal's own time split into writing and training (with the
conversion, the time a user waits), ``converter eval`` on the written folder (independent of
the heal's figure), and whether vLLM serves the result with transformers' 32 greedy tokens.

    python benchmarks/heal_teacher_text.py                      # writes "heal_teacher_text"
    python benchmarks/heal_teacher_text.py --teacher-text 20000 --tokens 20000 --no-write
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from converter.conversion.methods import DEFAULT_METHOD
from transmla_testing.launch import converter_cmd, run_quietly
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
TIME_TARGET_S = 45 * 60  # issue 24: conversion + writing + heal on 2 cores


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(p, ROOT / ".cache" / "heal", "128", 10240)
    p.add_argument("--teacher-text", type=int, default=131072, help="tokens the teacher writes")
    p.add_argument("--tokens", type=int, default=262144, help="heal tokens (passes over it)")
    p.add_argument("--reuse", action="store_true", help="keep a conversion in the work dir")
    args = p.parse_args()
    budget = int(args.budgets.split(",")[0])

    setup = tragedies(args)
    converted = default_conversion(setup, budget, args)
    convert_s = json.loads((converted / REPORT_FILE).read_text())["seconds"]
    healed = setup.work / f"smollm2-{budget}-teacher-text"
    heal_s = run_quietly(
        converter_cmd(
            ["heal", "--teacher", str(setup.src)]
            + ["--student", str(converted), "--dst", str(healed), "--overwrite"]
            + ["--tokens", str(args.tokens), "--teacher-text", str(args.teacher_text)]
            + ["--seqlen", str(args.ctx), "--eval-text", str(plays("tragedies"))]
            + ["--eval-tokens", str(args.eval_tokens)]
        )
    )
    heal = json.loads((healed / REPORT_FILE).read_text())["heal"]
    independent = converter_eval_ppl(healed, args)
    prompts = prompts_for(healed)
    served = run_vllm(healed, prompts, setup.work, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    same = [r["tokens"] for r in served["results"]] == [
        w["tokens"] for w in transformers_greedy(healed, prompts)
    ]
    lines = section(heal, convert_s, heal_s, independent, same, args, budget)
    publish("heal_teacher_text", lines, not args.no_write)
    return 0


def section(
    heal: dict,
    convert_s: float,
    heal_s: float,
    independent: float,
    same: bool,
    args: argparse.Namespace,
    budget: int,
) -> list[str]:
    ppl, text = heal["test"]["ppl"], heal["teacher_text"]
    removed = (ppl["before"] - ppl["after"]) / (ppl["before"] - ppl["teacher"])
    writing = text["seconds"] + text["engine_start_seconds"]
    total = convert_s + heal_s
    return [
        f"Command: `python benchmarks/heal_teacher_text.py --teacher-text {args.teacher_text} "
        f"--tokens {args.tokens}` (measured on this machine's 2 cores). SmolLM2-135M-Instruct "
        f"converted with `{DEFAULT_METHOD}` at {budget} KV elements, healed with no corpus: "
        f"the teacher wrote {text['tokens']} tokens in {text['documents']} chat documents "
        f"({text['prompting']}, {text['prompts']} generic user turns, temperature "
        f"{text['temperature']}, top-p {text['top_p']}); test rows the first "
        f"{args.eval_tokens} tokens of the tragedies, never trained on.",
        "",
        "| teacher PPL | converted | healed | increase removed | `converter eval` on the "
        "folder | writing (s) | tokens/s | heal in all (s) | with conversion (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {ppl['teacher']:.3f} | {ppl['before']:.3f} | {ppl['after']:.3f} | {removed:.0%} | "
        f"{independent:.3f} | {writing:.0f} | {text['tokens_per_second']:.0f} | {heal_s:.0f} | "
        f"{total:.0f} |",
        "",
        f"- within {TIME_TARGET_S // 60} min with the conversion: "
        f"{'yes' if total <= TIME_TARGET_S else 'no'}; at least half of the increase removed: "
        f"{'yes' if removed >= 0.5 else 'no'}.",
        f"- vLLM serves the healed folder with the same 32 greedy tokens as transformers: "
        f"{'yes' if same else 'NO'}.",
    ]


if __name__ == "__main__":
    sys.exit(main())
