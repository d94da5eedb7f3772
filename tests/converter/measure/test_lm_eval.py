"""lm-evaluation-harness on a converted folder, as users run it: lm-eval's command line with
``--model vllm`` (our plugin, found through its entry point, vLLM's default settings) and
``--model hf`` (our remote code), on the shipped offline tasks. Each item's loglikelihood and
greedy completion must match a direct transformers computation on the same folder, and
``verify --lm-eval-tasks`` must print and record the same scores for source and converted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from converter.measure.lm_eval import SHIPPED_TASKS, run_lm_eval
from transmla_testing.lm_eval_reference import CPU_MODEL_ARGS, DirectScorer, complete_chars

pytestmark = pytest.mark.vllm
LIMIT = 4  # items per task: a few, to keep CI time small


@pytest.fixture(scope="module")
def mla(converted) -> Path:
    return converted["llama"]  # llama3 rope scaling, latent 96 padded to 512 by vLLM on CPU


@pytest.fixture(scope="module")
def runs(mla):
    """One lm-eval run per backend on the converted folder, shared by the module's tests."""
    return {
        b: run_lm_eval(mla, b, list(SHIPPED_TASKS), CPU_MODEL_ARGS[b], LIMIT)
        for b in CPU_MODEL_ARGS
    }


@pytest.fixture(scope="module")
def direct(mla) -> DirectScorer:
    return DirectScorer(mla)


@pytest.mark.parametrize("backend", list(CPU_MODEL_ARGS))
def test_loglikelihoods_match_a_direct_computation(runs, direct, backend):
    samples = runs[backend].samples["transmla_cloze"]
    assert len(samples) == LIMIT
    worst = 0.0
    for sample in samples:
        doc = sample["doc"]
        got = [float(r[0][0]) for r in sample["resps"]]
        want = direct.choice_loglikelihoods(doc)
        worst = max(worst, *(abs(g - w) for g, w in zip(got, want, strict=True)))
    print(f"{backend}: max |loglikelihood difference| {worst:.2e}")
    assert worst < 1e-3
    docs = [s["doc"] for s in samples]
    assert runs[backend].scores["transmla_cloze"]["acc,none"] == direct.cloze_acc(docs)


@pytest.mark.parametrize("backend", list(CPU_MODEL_ARGS))
def test_completions_match_direct_greedy_decoding(runs, direct, backend):
    samples = runs[backend].samples["transmla_complete"]
    assert len(samples) == LIMIT
    texts = [complete_chars(s["resps"][0][0]) for s in samples]
    assert texts == [complete_chars(direct.greedy(s["doc"]["context"])) for s in samples]
    assert any(t.strip() for t in texts)  # something was generated


def test_backends_report_the_same_scores(runs):
    assert runs["vllm"].scores == runs["hf"].scores
    assert set(runs["hf"].scores) == set(SHIPPED_TASKS)


def test_verify_prints_and_records_source_and_converted(runs, mla, calib_file, tmp_path):
    """``verify --lm-eval-tasks`` (hf backend): the converted column is lm-eval's score on the
    converted folder, the source column a direct computation on the source folder."""
    dst = shutil.copytree(mla, tmp_path / "mla")
    src = json.loads((mla / "config.json").read_text())["transmla"]["source"]
    cmd = [sys.executable, "-m", "converter", "verify", "--src", src, "--dst", str(dst)]
    cmd += ["--text", str(calib_file), "--ctx", "64", "--max-tokens", "256", "--write-card"]
    cmd += ["--lm-eval-tasks", "transmla_cloze", "--lm-eval-backend", "hf"]
    cmd += ["--lm-eval-args", CPU_MODEL_ARGS["hf"], "--lm-eval-limit", str(LIMIT)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = [s["doc"] for s in runs["hf"].samples["transmla_cloze"]]
    acc_src, acc_dst = (
        DirectScorer(Path(src)).cloze_acc(docs),
        runs["hf"].scores["transmla_cloze"]["acc,none"],
    )
    line = next(ln for ln in proc.stdout.splitlines() if "transmla_cloze acc:" in ln)
    assert f"source {acc_src:.4f}, converted {acc_dst:.4f}" in line, proc.stdout
    assert line.startswith(f"lm-eval (hf, first {LIMIT} items)")
    recorded = json.loads((dst / "transmla_report.json").read_text())["verification"]["lm_eval"]
    assert recorded["scores"]["transmla_cloze"]["acc,none"] == {
        "source": acc_src,
        "converted": acc_dst,
    }
    assert (
        f"| transmla_cloze | acc | {acc_src:.4f} | {acc_dst:.4f} |"
        in (dst / "README.md").read_text()
    )


def test_verify_refuses_in_one_line_without_lm_eval(mla, calib_file):
    """lm-eval hidden from the import system: one line, status 2, before any model is loaded."""
    src = json.loads((mla / "config.json").read_text())["transmla"]["source"]
    code = (
        "import sys; sys.modules['lm_eval'] = None; from converter.cli import main; "
        f"sys.exit(main(['verify', '--src', {src!r}, '--dst', {str(mla)!r}, '--text', "
        f"{str(calib_file)!r}, '--lm-eval-tasks', 'transmla_cloze']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --lm-eval-tasks needs lm-eval, which is not installed: "
        "pip install 'transmla-vllm[lmeval]'"
    ]
