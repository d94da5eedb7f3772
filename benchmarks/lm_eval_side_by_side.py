"""lm-evaluation-harness on SmolLM2-135M-Instruct and its conversion, side by side, through
both backends users run (vLLM with our plugin, transformers with our remote code), on the
shipped offline tasks (converter/lm_eval_tasks), next to PPL / top-1 / KL on the tragedies;
every item also scored by hand in transformers to check what each backend reports.

    python benchmarks/lm_eval_side_by_side.py    # writes docs/benchmarks.md's "lm_eval" section
    python benchmarks/lm_eval_side_by_side.py --limit 8 --no-write   # quick look
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path

from converter.measure.lm_eval import SHIPPED_TASKS, LmEvalRun, run_lm_eval
from transmla_testing.conversions import comedies_convert_cmd
from transmla_testing.lm_eval_reference import CPU_MODEL_ARGS, DirectScorer, complete_chars
from transmla_testing.report import publish
from transmla_testing.text import plays
from transmla_vllm.checkpoint_format import REPORT_FILE

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("source", "converted")


def convert(src: Path, dst: Path, rank: int, samples: int) -> list[str]:
    """Convert once (kept in the work dir); the command, for the section."""
    cmd = comedies_convert_cmd(src, dst, samples, "--kv-lora-rank", str(rank))
    if not (dst / REPORT_FILE).is_file():
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cmd


def check_items(run: LmEvalRun, scorer: DirectScorer) -> tuple[float, int, int]:
    """Largest |loglikelihood - direct| over every cloze choice, and completions equal to the
    direct greedy text (of how many)."""
    worst = 0.0
    for sample in run.samples["transmla_cloze"]:
        got = [float(r[0][0]) for r in sample["resps"]]
        want = scorer.choice_loglikelihoods(sample["doc"])
        worst = max(worst, *(abs(g - w) for g, w in zip(got, want, strict=True)))
    completions = run.samples["transmla_complete"]
    same = sum(
        complete_chars(s["resps"][0][0]) == complete_chars(scorer.greedy(s["doc"]["context"]))
        for s in completions
    )
    return worst, same, len(completions)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "lm_eval"))
    p.add_argument("--kv-lora-rank", type=int, default=256)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--eval-tokens", type=int, default=4096, help="PPL / top-1 / KL tokens")
    p.add_argument("--limit", type=int, help="items per task (default: all)")
    p.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = p.parse_args()

    from converter.calibration.text import read_calibration_text
    from converter.checkpoint.source import load_tokenizer
    from converter.measure.perplexity import agreement, load_model, windows
    from converter.sources.bundled import materialize_smollm2

    started = time.time()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    folders = {"source": materialize_smollm2(work / "SmolLM2-135M-Instruct")}
    folders["converted"] = work / "smollm2-mla"
    convert_cmd = convert(
        folders["source"], folders["converted"], args.kv_lora_rank, args.calib_samples
    )
    text = read_calibration_text(plays("tragedies"))[0]
    batch = windows(load_tokenizer(folders["source"]), text, 512, args.eval_tokens)
    agree = agreement(load_model(folders["source"]), load_model(folders["converted"]), batch)
    runs, seconds = {}, {}
    for backend in CPU_MODEL_ARGS:
        for role in ROLES:
            t = time.time()
            runs[backend, role] = run_lm_eval(
                folders[role], backend, list(SHIPPED_TASKS), CPU_MODEL_ARGS[backend], args.limit
            )
            seconds[backend, role] = time.time() - t
            print(backend, role, runs[backend, role].scores, flush=True)
    checks = {}
    for role in ROLES:
        scorer = DirectScorer(folders[role])
        for backend in CPU_MODEL_ARGS:
            checks[backend, role] = check_items(runs[backend, role], scorer)
    lines = section(args, convert_cmd, agree, runs, seconds, checks, time.time() - started)
    publish("lm_eval", lines, write=not args.no_write)
    return 0


def section(args, convert_cmd, agree, runs, seconds, checks, wall) -> list[str]:
    rel = [str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in convert_cmd]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    cmd = "python benchmarks/lm_eval_side_by_side.py" + (
        f" --limit {args.limit}" if args.limit else ""
    )
    items = f"the first {args.limit} items of each task" if args.limit else "every item"
    lines = [
        "## lm-evaluation-harness: SmolLM2-135M source vs converted "
        "(`benchmarks/lm_eval_side_by_side.py`)",
        "",
        f"Command: `{cmd}` -- {datetime.date.today()}, commit {commit}, {platform.machine()}, "
        f"CPU only, total wall time {wall / 60:.1f} min. Conversion: `python -m converter "
        f"{' '.join(rel[3:])}`.",
        "",
        f"Tasks: the shipped offline tasks (converter/lm_eval_tasks), {items}: `transmla_cloze` "
        "(which of 4 words ends a sentence of the Python Language Reference, loglikelihood) and "
        "`transmla_complete` (write that word, greedy, exact match). Their text is also in the "
        "converter's default calibration set; this conversion calibrated on Shakespeare "
        "comedies instead. lm-eval model_args besides `pretrained=DIR,trust_remote_code=True`: "
        + ", ".join(f"{b}: `{a}`" for b, a in CPU_MODEL_ARGS.items())
        + ".",
        "",
        f"Next to it, as `verify` prints it: PPL source {agree.ppl_source:.3f}, converted "
        f"{agree.ppl_converted:.3f} ({100 * (agree.ppl_converted / agree.ppl_source - 1):+.2f}%); "
        f"top-1 agreement {100 * agree.top1_agreement:.2f}%; mean KL {agree.mean_kl:.4f} nats "
        f"over {agree.tokens} tokens of the tragedies.",
        "",
        "| backend | task | metric | source | converted | change |",
        "|---|---|---|---:|---:|---:|",
    ]
    for backend in CPU_MODEL_ARGS:
        for task, metrics in runs[backend, "source"].scores.items():
            for key, s in metrics.items():
                c = runs[backend, "converted"].scores[task][key]
                lines.append(f"| {backend} | {task} | {key} | {s:.4f} | {c:.4f} | {c - s:+.4f} |")
    same = all(runs["vllm", r].scores == runs["hf", r].scores for r in ROLES)
    lines += [
        "",
        f"The two backends report {'the same' if same else 'DIFFERENT'} scores. Each item "
        "against a direct transformers computation (fp32, full recompute, no lm-eval code):",
        "",
        "| backend | model | max abs. loglikelihood difference (cloze choices) "
        "| completions equal to direct greedy | lm-eval wall time (s) |",
        "|---|---|---:|---:|---:|",
    ]
    for (backend, role), (worst, equal, total) in checks.items():
        lines.append(
            f"| {backend} | {role} | {worst:.2e} | {equal}/{total} | {seconds[backend, role]:.0f} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
