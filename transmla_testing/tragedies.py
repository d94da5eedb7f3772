"""The Shakespeare benchmarks' shared setup (quality, fp8_cache, loss_sources): the bundled
SmolLM2 in a work folder, the tragedies cut into evaluation windows, the source's perplexity
on them, and the command-line options every one of those scripts takes."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from transmla_testing.text import plays


def add_common_args(
    p: argparse.ArgumentParser, workdir: Path, budgets: str, eval_tokens: int
) -> None:
    """--workdir, --budgets, --calib-samples, --eval-tokens, --ctx, --no-write."""
    p.add_argument("--workdir", default=str(workdir))
    p.add_argument("--budgets", default=budgets, help="KV elements per token and layer")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-tokens", type=int, default=eval_tokens)
    p.add_argument("--ctx", type=int, default=512, help="evaluation window")
    p.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")


@dataclass(frozen=True)
class Tragedies:
    work: Path
    src: Path  # the bundled SmolLM2-135M-Instruct, materialized in ``work``
    batch: torch.Tensor  # [windows, ctx] token ids of the tragedies
    source_ppl: float

    @property
    def tokens(self) -> int:
        """Scored tokens (every window's first token is only context)."""
        return self.batch.shape[0] * (self.batch.shape[1] - 1)


def tragedies(args: argparse.Namespace) -> Tragedies:
    """The work folder, the source model, the evaluation windows and the source's PPL."""
    from converter.calibration.text import read_calibration_text
    from converter.checkpoint.source import load_tokenizer
    from converter.measure.perplexity import load_model, perplexity, windows
    from converter.sources.bundled import materialize_smollm2

    torch.manual_seed(0)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = materialize_smollm2(work / "SmolLM2-135M-Instruct")
    text = read_calibration_text(plays("tragedies"))[0]
    batch = windows(load_tokenizer(src), text, args.ctx, args.eval_tokens)
    setup = Tragedies(work, src, batch, perplexity(load_model(src), batch))
    print(f"source PPL {setup.source_ppl:.3f} over {setup.tokens} tokens", flush=True)
    return setup


def converter_eval_ppl(folder: Path, args: argparse.Namespace) -> float:
    """``python -m converter eval`` on a written folder over the first ``--eval-tokens`` of the
    tragedies in ``--ctx`` windows: the independent figure a heal's reported PPL is checked
    against."""
    import json
    import subprocess

    from transmla_testing.launch import converter_cmd

    out = subprocess.run(
        converter_cmd(["eval", "--model", str(folder)])
        + ["--text", str(plays("tragedies")), "--ctx", str(args.ctx)]
        + ["--max-tokens", str(args.eval_tokens), "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(json.loads(out.stdout)["ppl"])


def default_conversion(setup: Tragedies, budget: int, args: argparse.Namespace) -> Path:
    """SmolLM2 converted with the default method at ``budget`` KV elements on the comedies: the
    folder benchmarks/heal.py makes (kept with ``args.reuse`` when it is there)."""
    from converter.conversion.methods import DEFAULT_METHOD
    from transmla_testing.conversions import comedies_convert_cmd
    from transmla_testing.launch import run_quietly
    from transmla_vllm.checkpoint_format import REPORT_FILE

    converted = setup.work / f"smollm2-{DEFAULT_METHOD}-{budget}"
    if not (args.reuse and (converted / REPORT_FILE).is_file()):
        cmd = comedies_convert_cmd(
            setup.src, converted, args.calib_samples, "--kv-elements", str(budget)
        )
        run_quietly(cmd)
    return converted
