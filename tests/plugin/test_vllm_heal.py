"""A healed checkpoint is served by the plugin unchanged: vLLM (CPU_MLA, latent padded at load)
gives the same 32 greedy tokens as transformers' remote code. The heal runs under torchrun (two
gloo ranks, FSDP2), so this also checks what a sharded heal writes."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from transmla_testing import conversions
from transmla_testing.hooked import run_torchrun
from transmla_testing.parity import prompts_for, run_vllm, transformers_greedy

pytestmark = pytest.mark.vllm


def test_healed_checkpoint_is_served_like_transformers_runs_it(converted, calib_file, tmp_path):
    student = converted["llama"]
    source = json.loads((student / "config.json").read_text())["transmla"]["source"]
    healed = tmp_path / "healed"
    flags = ("--seqlen", "64", "--batch-size", "8", "--lr", "1e-2", "--eval-every", "1024")
    flags += ("--keep-worse",)  # this test is about serving a changed checkpoint
    proc = run_torchrun(conversions.heal_args(source, student, healed, 4096, calib_file, *flags))
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = (
        load_file(student / "model.safetensors"),
        load_file(healed / "model.safetensors"),
    )
    assert any(not before[k].equal(after[k]) for k in before)  # the heal changed the weights
    prompts = prompts_for(healed)
    got = run_vllm(healed, prompts, tmp_path, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert got["info"]["use_mla"] is True
    want = transformers_greedy(healed, prompts)
    assert [r["tokens"] for r in got["results"]] == [w["tokens"] for w in want]
