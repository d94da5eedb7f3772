"""vLLM's CPU rope kernel mis-rotates a [tokens, heads, dim] tensor of several heads; the
plugin's FlatRope hands it [tokens, heads * dim] and matches vLLM's pure-torch rope exactly."""

from __future__ import annotations

import pytest
import torch

from transmla_vllm.flat_rope import FlatRope

pytestmark = pytest.mark.vllm
TOKENS, HEADS, DIM = 7, 4, 64


@pytest.fixture(scope="module")
def rope():
    """vLLM's GPT-J style rope (what the plugin serves), custom ops on: the CPU kernel runs."""
    from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(
        VllmConfig(compilation_config=CompilationConfig(custom_ops=["all"]))
    ):
        made = get_rope(
            DIM,
            max_position=512,
            is_neox_style=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    assert made._forward_method == made.forward_cpu
    return made


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(TOKENS, HEADS, 2 * DIM, generator=g)[..., DIM:]  # a strided rope slice
    return torch.arange(TOKENS) + 3, q, torch.randn(TOKENS, 1, DIM, generator=g)


def test_flat_rope_matches_vllm_torch_rope(rope):
    positions, q, k = _inputs()
    want_q, want_k = rope.forward_native(positions, q.clone(), k.clone())
    got_q, got_k = FlatRope(rope)(positions, q.clone(), k.clone())
    assert got_q.shape == q.shape and got_k.shape == k.shape
    torch.testing.assert_close(got_q, want_q, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=0, atol=1e-5)


def test_vllm_cpu_rope_still_skips_heads_of_3d_input(rope):
    """Why FlatRope exists; when this fails, vLLM fixed its kernel and FlatRope can go."""
    positions, q, k = _inputs()
    want_q, _ = rope.forward_native(positions, q.clone(), k.clone())
    got_q, _ = rope(positions, q.clone(), k.clone())
    assert (got_q - want_q).abs().max() > 0.1
