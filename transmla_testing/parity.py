"""The vLLM-vs-transformers parity check's parts, shared by the plugin tests (a test module's
helpers are not importable under --import-mode=importlib): Hamlet prompts, transformers' greedy
continuation by full recompute, and one greedy vLLM run in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from transmla_testing.text import play_text

RUNNER = "transmla_testing.vllm_runner"  # run as python -m RUNNER
MAX_TOKENS = 32


def prompts_for(model_dir: Path) -> list[list[int]]:
    """Two Hamlet prompts (40 and 17 tokens) in ``model_dir``'s tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = play_text("hamlet", "tragedies")
    return [tok(text[i : i + 300])["input_ids"][:n] for i, n in ((5000, 40), (90000, 17))]


@torch.no_grad()
def transformers_greedy(model_dir: Path, prompts: list[list[int]]) -> list[dict]:
    """MAX_TOKENS greedy tokens per prompt and their log-probabilities, from our remote code in
    fp32, every step recomputed from the whole sequence (independent of any cache)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=True
    )
    outs = []
    for ids in prompts:
        seq = torch.tensor([ids])
        for _ in range(MAX_TOKENS):
            nxt = model(seq, use_cache=False).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
        logp = model(seq, use_cache=False).logits[0].log_softmax(-1)
        gen = seq[0, len(ids) :]
        lps = logp[len(ids) - 1 : -1].gather(-1, gen[:, None])[:, 0]
        outs.append({"tokens": gen.tolist(), "logprobs": lps.tolist()})
    return outs


def run_vllm(
    model: Path, prompts: list[list[int]], tmp: Path, tp: int = 1, env: dict[str, str] | None = None
) -> dict:
    """Greedy outputs and engine info from a fresh vLLM process; ``log`` holds its output."""
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    env = {**os.environ, **(env or {})}
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    cmd = [sys.executable, "-m", RUNNER, "--model", str(model), "--prompts"]
    cmd += [str(tmp / "prompts.json"), "--out", str(tmp / "out.json"), "--tp", str(tp)]
    cmd += ["--max-tokens", str(MAX_TOKENS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise AssertionError(f"vLLM run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return {**json.loads((tmp / "out.json").read_text()), "log": proc.stdout + proc.stderr}
