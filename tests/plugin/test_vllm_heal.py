"""A healed checkpoint is served by the plugin unchanged: vLLM (CPU_MLA, latent padded at load)
gives the same 32 greedy tokens as transformers' remote code. (Its own file: the helpers of
test_vllm_parity.py are not importable under --import-mode=importlib.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from converter.heal import HealOptions, heal
from transmla_testing.text import play_text

pytestmark = pytest.mark.vllm
MAX_TOKENS = 32


@torch.no_grad()
def greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=True
    )
    outs = []
    for ids in prompts:
        seq = torch.tensor([ids])
        for _ in range(MAX_TOKENS):  # full recompute: independent of any cache
            nxt = model(seq, use_cache=False).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
        outs.append(seq[0, len(ids) :].tolist())
    return outs


def test_healed_checkpoint_is_served_like_transformers_runs_it(converted, calib_file, tmp_path):
    student = converted["llama"]
    source = json.loads((student / "config.json").read_text())["transmla"]["source"]
    healed = heal(
        HealOptions(
            teacher=source,
            student=str(student),
            dst=str(tmp_path / "healed"),
            tokens=4096,
            seqlen=64,
            batch_size=8,
            lr=1e-3,
            eval_every=1024,
            calib_text=str(calib_file),
        )
    )
    before, after = (
        load_file(student / "model.safetensors"),
        load_file(healed / "model.safetensors"),
    )
    assert any(not before[k].equal(after[k]) for k in before)  # the heal changed the weights
    tok = AutoTokenizer.from_pretrained(healed)
    text = play_text("hamlet", "tragedies")
    prompts = [tok(text[i : i + 300])["input_ids"][:n] for i, n in ((5000, 40), (90000, 17))]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "transmla_testing.vllm_runner",
            "--model",
            str(healed),
            "--prompts",
            str(tmp_path / "prompts.json"),
            "--out",
            str(tmp_path / "out.json"),
            "--max-tokens",
            str(MAX_TOKENS),
        ],
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["info"]["use_mla"] is True
    assert [r["tokens"] for r in got["results"]] == greedy(healed, prompts)
