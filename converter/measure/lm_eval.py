"""Score a model folder with lm-evaluation-harness, the way users do: lm-eval's own command line
(``--model vllm`` with our plugin, or ``--model hf`` with our remote code) in a child process,
reading back its results and per-item samples. A child process per folder gives each vLLM
engine a fresh process (the plugin found through its entry point, memory returned at exit).
The shipped offline tasks live in converter/lm_eval_tasks."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from converter.errors import ConversionError
from converter.vllm_setup import VLLM_INSTALL_HINT, vllm_installed

TASKS_DIR = Path(__file__).resolve().parents[1] / "lm_eval_tasks"
SHIPPED_TASKS = tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))  # task = file name
BACKENDS = ("vllm", "hf")
# model_args every run gets besides the folder: our remote code defines the converted
# architecture for transformers, and vLLM reads the folder's config through it too.
REMOTE_CODE_ARG = "trust_remote_code=True"
# hf's "auto" batch size probes ever larger batches, slow on CPU; vLLM schedules its own.
BATCH_SIZE = {"vllm": "auto", "hf": "8"}
INSTALL_HINT = "pip install 'transmla-vllm[lmeval]'"
LAUNCHER = "converter.measure.lm_eval_cli"  # lm-eval's CLI, able to run vLLM's CPU build


@dataclass(frozen=True)
class LmEvalRun:
    """One folder's scores: ``scores[task][metric]`` as lm-eval reports them (metric keys like
    ``acc,none``), each task's logged ``samples`` (lm-eval's per-item records), and the
    command that produced them."""

    scores: dict[str, dict[str, float]]
    samples: dict[str, list[dict]] = field(repr=False)
    command: list[str]


def require_lm_eval(backend: str) -> None:
    """Refuse in one line when lm-eval (or vLLM, for its vLLM backend) is not installed."""
    if backend not in BACKENDS:
        raise ConversionError(f"lm-eval backend must be one of {', '.join(BACKENDS)}")
    if importlib.util.find_spec("lm_eval") is None:
        raise ConversionError(
            f"--lm-eval-tasks needs lm-eval, which is not installed: {INSTALL_HINT}"
        )
    if backend == "vllm" and not vllm_installed():
        raise ConversionError(f"--lm-eval-backend vllm needs vLLM: {VLLM_INSTALL_HINT}")


def lm_eval_command(
    folder: Path,
    backend: str,
    tasks: list[str],
    output: Path,
    model_args: str = "",
    limit: int | None = None,
) -> list[str]:
    """The lm-eval command line for ``folder`` (what a user can run by hand: replace the
    launcher with ``lm_eval`` on a GPU install)."""
    args = ",".join(a for a in (f"pretrained={folder}", REMOTE_CODE_ARG, model_args) if a)
    cmd = [sys.executable, "-m", LAUNCHER, "run", "--model", backend, "--model_args", args]
    cmd += ["--tasks", ",".join(tasks), "--include_path", str(TASKS_DIR)]
    cmd += ["--output_path", str(output), "--log_samples", "--batch_size", BATCH_SIZE[backend]]
    return cmd + (["--limit", str(limit)] if limit is not None else [])


def run_lm_eval(
    folder: Path,
    backend: str,
    tasks: list[str],
    model_args: str = "",
    limit: int | None = None,
) -> LmEvalRun:
    """Run ``tasks`` on ``folder`` with ``backend``; ``limit``: the first N items of each."""
    require_lm_eval(backend)
    with tempfile.TemporaryDirectory(prefix="transmla-lm-eval-") as tmp:
        cmd = lm_eval_command(folder, backend, tasks, Path(tmp), model_args, limit)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ConversionError(
                f"lm-eval ({backend}) failed on {folder} with status {proc.returncode}: {tail}"
            )
        return _read_outputs(Path(tmp), cmd)


def _read_outputs(output: Path, cmd: list[str]) -> LmEvalRun:
    """lm-eval writes OUTPUT/<model name>/results_<time>.json and samples_<task>_<time>.jsonl."""
    (results,) = output.rglob("results_*.json")
    scores = {
        task: {
            k: float(v)
            for k, v in metrics.items()
            if "_stderr," not in k and isinstance(v, int | float) and "," in k
        }
        for task, metrics in json.loads(results.read_text())["results"].items()
    }
    samples = {}
    for task in scores:
        (path,) = results.parent.glob(f"samples_{task}_*.jsonl")
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return LmEvalRun(scores, samples, cmd)
