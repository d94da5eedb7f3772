"""The memory-saving parts of the streaming converter compute what the plain path computes.

The source MLP stays in its stored dtype and runs blocked (converter/conversion/blocked_mlp.py);
dense weights are copied to the output without passing through fp32; the calibration stream is
updated in place. These tests hold each of them to an independent reference.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from converter.checkpoint.source_reader import SourceReader
from converter.conversion.blocked_mlp import blocked_mlp_forward, use_blocked_mlp
from converter.conversion.pipeline import ConvertOptions, convert
from transmla_testing.models import make_model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block", [7, 16, 1000])
def test_blocked_mlp_matches_transformers_mlp_in_fp32(dtype, block):
    config = LlamaConfig(
        hidden_size=24,
        intermediate_size=40,
        hidden_act="silu",
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    stored = LlamaMLP(config).to(dtype)
    reference = LlamaMLP(config)  # the same weights, upcast to fp32 before the product
    reference.load_state_dict({k: v.float() for k, v in stored.state_dict().items()})
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        want = reference(x)
        got = blocked_mlp_forward(stored, x, block=block)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        use_blocked_mlp(stored, block=block)
        torch.testing.assert_close(stored(x), want, rtol=1e-5, atol=1e-5)
    # the stored weights were never replaced by upcast copies
    assert stored.gate_proj.weight.dtype == dtype


def test_blocked_mlp_refuses_biases():
    config = LlamaConfig(
        hidden_size=8,
        intermediate_size=16,
        mlp_bias=True,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    with pytest.raises(ValueError, match="without biases"):
        use_blocked_mlp(LlamaMLP(config))


@pytest.mark.parametrize("method", ["refit", "sequential-global"])
def test_bf16_source_streams_exactly(tmp_path, calib_file, method):
    """A bf16 source in an exact case (shared keys, full rope, full-rank latent), converted to
    fp32: logits match the source model run in fp32 on its bf16 weights, and every dense
    tensor is carried over bit for bit."""
    src = make_model(tmp_path / "src", shared_keys=True, dtype=torch.bfloat16, tied=False)
    dst = convert(
        ConvertOptions(
            src=str(src),
            dst=str(tmp_path / "dst"),
            rope_dim=16,
            freqfold=1,
            kv_lora_rank=32,
            dtype="float32",
            method=method,
            calib_text=str(calib_file),
            calib_samples=8,
            calib_seqlen=64,
        )
    )
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    mla = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, trust_remote_code=True)
    ids = torch.randint(3, 512, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(ids).logits, mla(ids).logits
    assert float((want - got).norm() / want.norm()) <= 1e-4
    reader = SourceReader(src)
    with safe_open(str(dst / "model.safetensors"), framework="pt") as out:
        for name in out.keys():
            if "self_attn" in name:
                continue
            stored = reader.get(name, dtype=None)
            assert stored.dtype == torch.bfloat16
            assert torch.equal(out.get_tensor(name), stored.float()), name


def test_peak_rss_is_the_conversions_own_not_its_parents():
    """A conversion started by a process that holds a model (the benchmarks do) must report its
    own peak memory: ru_maxrss after vfork + exec carries the parent's high-water mark."""
    import subprocess
    import sys

    from converter.conversion.device import peak_rss_bytes

    ballast = torch.ones(600 * 2**20, dtype=torch.uint8)  # 600 MiB resident in this process
    assert peak_rss_bytes() > 600 * 2**20
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "from converter.conversion.device import peak_rss_bytes as p; print(p())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    del ballast
    # the child imports torch (a few hundred MB at most) but never holds the 600 MiB
    own = int(child.stdout)
    assert 0 < own < 500 * 2**20, own
