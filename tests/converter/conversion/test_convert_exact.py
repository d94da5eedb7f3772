"""Test 1 of the spine: conversions that must be exact match the source's logits.

Keys of all KV heads are scalar multiples of one another (for Qwen3, whose keys are normalised
per head, equal up to sign after the norm), so with rope dim = head_dim and FreqFold 1 all key
energy sits in the rope part, and a latent rank >= the V rank keeps everything: the converted
model (our transformers remote code) must reproduce the source.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from converter.conversion.pipeline import ConvertOptions, convert
from transmla_testing.models import make_model

CASES = {
    "llama-gqa-tied-llama3": dict(
        family="llama",
        heads=4,
        kv_heads=2,
        head_dim=16,
        tied=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2-bias-untied": dict(family="qwen2", heads=4, kv_heads=2, head_dim=16, tied=False),
    "mistral-linear-rope": dict(
        family="mistral",
        heads=6,
        kv_heads=3,
        head_dim=16,
        tied=False,
        hidden=96,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "llama-mha-hd64": dict(family="llama", heads=2, kv_heads=2, head_dim=64, hidden=128),
    "qwen2-hd128": dict(family="qwen2", heads=2, kv_heads=1, head_dim=128, hidden=128),
    # per-head q/k RMSNorm: the normed attention path (identical normalised keys up to sign)
    "qwen3-qk-norm-untied": dict(family="qwen3", heads=4, kv_heads=2, head_dim=16, tied=False),
    # Qwen3 attention plus experts (layer 0) and a dense MLP (layer 1), copied through
    "qwen3-moe": dict(family="qwen3_moe", heads=4, kv_heads=2, head_dim=16, tied=False),
}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_conversion_matches_source_logits(case, tmp_path, calib_file):
    kw = CASES[case]
    src = make_model(tmp_path / "src", shared_keys=True, **kw)
    width = kw["kv_heads"] * kw["head_dim"]
    # rope = head_dim keeps every key dim positional: exact in transformers, but a rope above
    # 64 is not served as MLA by vLLM on a GPU, so those cases convert with --target hf
    dst = convert(
        ConvertOptions(
            src=str(src),
            dst=str(tmp_path / "dst"),
            rope_dim=kw["head_dim"],
            freqfold=1,
            kv_lora_rank=width,
            target="vllm" if kw["head_dim"] <= 64 else "hf",
            calib_text=str(calib_file),
            calib_samples=8,
            calib_seqlen=64,
        )
    )
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["kv_lora_rank"] == width and cfg["qk_rope_head_dim"] == kw["head_dim"]
    assert cfg["tie_word_embeddings"] == kw.get("tied", True)
    if kw["family"] == "qwen3_moe":  # Qwen3's routing, said in our block; DeepSeek's fields dense
        assert cfg["transmla"]["mlp"]["type"] == "qwen3_moe" and cfg["n_routed_experts"] == 0
        assert cfg["transmla"]["mlp"]["sparse_layers"] == [0]
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    mla = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, trust_remote_code=True)
    assert type(mla).__name__ == "TransMLAForCausalLM"
    ids = torch.randint(3, 512, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(ids).logits, mla(ids).logits
    assert relative_error(want, got) <= 1e-4
    # incremental decoding through the KV cache gives the same greedy continuation
    prompt = ids[:1, :20]
    with torch.no_grad():
        out_ref = ref.generate(prompt, max_new_tokens=16, do_sample=False)
        out_mla = mla.generate(prompt, max_new_tokens=16, do_sample=False)
    assert out_ref.tolist() == out_mla.tolist()
