"""Where a heal step's time goes on this machine: teacher forward, student forward, the KL
loss (with its gradient, ChunkedKL), student backward + AdamW, for each precision and batch
size, measured side by side in one process on SmolLM2-135M-Instruct converted at 128 KV
elements (the heal benchmark's student; converted here when absent).

    python benchmarks/heal_step.py            # writes the "heal_step" section of docs/benchmarks.md
    python benchmarks/heal_step.py --no-write
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from converter.conversion.methods import DEFAULT_METHOD
from converter.heal.objective import autocast, distill_loss, fast_cpu_bf16, hidden_states
from transmla_testing.conversions import comedies_convert_cmd
from transmla_testing.report import publish
from transmla_vllm.checkpoint_format import REPORT_FILE

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("teacher", "student forward", "loss", "backward + step")


def student_folder(work: Path, samples: int) -> tuple[Path, Path]:
    from converter.sources.bundled import materialize_smollm2

    src = materialize_smollm2(work / "SmolLM2-135M-Instruct")
    student = work / f"smollm2-{DEFAULT_METHOD}-128"  # benchmarks/heal.py's folder name
    if not (student / REPORT_FILE).is_file():
        cmd = comedies_convert_cmd(src, student, samples, "--kv-elements", "128")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return src, student


def time_step(teacher, student, opt, ids, precision: str) -> dict[str, float]:
    """One optimizer step, each part timed (CPU: synchronous)."""
    marks = [time.perf_counter()]
    with autocast("cpu", precision):
        with torch.no_grad():
            t_hidden = hidden_states(teacher, ids)
        marks.append(time.perf_counter())
        s_hidden = hidden_states(student, ids)
        marks.append(time.perf_counter())
        loss, _ = distill_loss(s_hidden, t_hidden, student.lm_head.weight, teacher.lm_head.weight)
    marks.append(time.perf_counter())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    marks.append(time.perf_counter())
    return {part: b - a for part, a, b in zip(PARTS, marks[:-1], marks[1:], strict=True)}


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "heal"))
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--batches", default="1,4", help="sequences per step")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--steps", type=int, default=4, help="timed steps per setting (after one)")
    p.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = p.parse_args()

    from converter.conversion.device import keep_freed_memory
    from converter.heal.inputs import check_pair
    from converter.heal.loop import trained
    from converter.heal.models import load_models

    keep_freed_memory()  # as heal does
    src, student_dir = student_folder(Path(args.workdir), args.calib_samples)
    pair = check_pair(str(src), str(student_dir), None)
    precisions = ["fp32", "bf16"]
    teacher, student = load_models(pair, "attention", "cpu", "fp32", checkpointing=False)
    opt = torch.optim.AdamW(trained(student).values(), lr=1e-12)  # timing only: weights stay
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        ids = torch.randint(0, pair.spec.vocab_size, (batch, args.seqlen), generator=g)
        for precision in precisions:
            time_step(teacher, student, opt, ids, precision)  # warm-up
            runs = [time_step(teacher, student, opt, ids, precision) for _ in range(args.steps)]
            median = {k: statistics.median(r[k] for r in runs) for k in PARTS}
            total = sum(median.values())
            rows.append((batch, precision, median, total, batch * args.seqlen / total))
            print(batch, precision, f"{total:.2f} s", flush=True)
    publish("heal_step", section(rows, args), write=not args.no_write)
    return 0


def section(rows: list, args: argparse.Namespace) -> list[str]:
    head = "| sequences x tokens | precision | " + " | ".join(PARTS) + " | step s | tokens/s |"
    lines = [
        "## Heal step: where the time goes (SmolLM2-135M-Instruct at 128 KV elements, CPU)",
        "",
        f"Command: `python benchmarks/heal_step.py --batches {args.batches} --seqlen "
        f"{args.seqlen} --steps {args.steps}` ({time.strftime('%Y-%m-%d')}, "
        f"{torch.get_num_threads()} threads, AMX bf16 {'yes' if fast_cpu_bf16() else 'no'}, "
        f"1-minute load average {os.getloadavg()[0]:.1f} at the end). Median of "
        f"{args.steps} steps after a warm-up, seconds; attention weights trained, the teacher "
        "alongside; all settings in one process.",
        "",
        head,
        "|" + "---|" * (len(PARTS) + 4),
    ]
    for batch, precision, median, total, rate in rows:
        parts = " | ".join(f"{median[k]:.2f}" for k in PARTS)
        lines.append(
            f"| {batch} x {args.seqlen} | {precision} | {parts} | {total:.2f} | {rate:.0f} |"
        )
    fp32 = {b: r for b, p, _, _, r in rows if p == "fp32"}
    ratios = ", ".join(
        f"{r / fp32[b]:.2f}x at {b} x {args.seqlen}" for b, p, _, _, r in rows if p == "bf16"
    )
    lines += ["", f"bf16 against fp32 tokens/s: {ratios}."]
    return lines


if __name__ == "__main__":
    sys.exit(main())
