"""Test 3 of the spine: vLLM (our plugin, MLA backend, paged latent cache) and transformers (our
remote code) produce the same greedy tokens and logprobs for the same converted checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny import play_text

RUNNER = Path(__file__).with_name("vllm_runner.py")
MAX_TOKENS = 32


def run_vllm(model: Path, prompts: list[list[int]], tmp: Path, tp: int = 1) -> dict:
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    env = dict(os.environ)
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--model", str(model), "--prompts", str(tmp / "prompts.json"),
         "--out", str(tmp / "out.json"), "--tp", str(tp), "--max-tokens", str(MAX_TOKENS)],
        env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise AssertionError(f"vLLM run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads((tmp / "out.json").read_text())


@torch.no_grad()
def transformers_greedy(model_dir: Path, prompts: list[list[int]]) -> list[dict]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 trust_remote_code=True)
    outs = []
    for ids in prompts:
        seq = torch.tensor([ids])
        for _ in range(MAX_TOKENS):  # full recompute: independent of any cache
            nxt = model(seq, use_cache=False).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
        logp = model(seq, use_cache=False).logits[0].log_softmax(-1)
        gen = seq[0, len(ids):]
        lps = logp[len(ids) - 1:-1].gather(-1, gen[:, None])[:, 0]
        outs.append({"tokens": gen.tolist(), "logprobs": lps.tolist()})
    return outs


def prompts_for(model_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = play_text("hamlet", "tragedies")
    return [tok(text[i:i + 300])["input_ids"][:n] for i, n in ((5000, 40), (90000, 17))]


def assert_parity(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        assert len(set(w["tokens"])) >= 8  # a real continuation, not one token repeated
        diff = max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"], strict=True))
        assert diff <= 1e-3, diff


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_vllm_matches_transformers(name, converted, tmp_path):
    model = converted[name]
    prompts = prompts_for(model)
    got = run_vllm(model, prompts, tmp_path)
    assert got["info"]["use_mla"] is True
    assert got["info"]["architecture"] == ["TransMLAForCausalLM"]
    assert_parity(got["results"], transformers_greedy(model, prompts))


def test_vllm_tensor_parallel_matches_transformers(converted, tmp_path):
    model = converted["qwen2"]
    prompts = prompts_for(model)
    got = run_vllm(model, prompts, tmp_path, tp=2)
    assert_parity(got["results"], transformers_greedy(model, prompts))
