"""The normed attention's projections for vLLM (sources with per-head q/k RMSNorm, e.g. Qwen3).

vLLM's MLA wrapper calls ``q_proj(x)[0]`` and ``kv_a_proj_with_mqa(x)[0]`` on the hidden states.
Here those two calls run the source's projection, its per-head RMSNorm and our linear map, so the
[latent; rope key] the wrapper caches and the query it absorbs are the same kind of tensors as
for a LLaMA conversion: vLLM's MLA backends, paged latent cache and weight absorption stay
vLLM's. The format (tensor names, shapes) is ``checkpoint_format``'s normed attention.

The parameters belong to the attention module (their names are the checkpoint's); the two
callables below only hold references to them, so nothing is registered twice.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear
from vllm.model_executor.layers.quantization import QuantizationConfig

from transmla_vllm.checkpoint_format import QKNorm


class HeadwiseLinear(nn.Module):
    """One (out x in) map per local head; the checkpoint stores (heads * out, in) for all heads
    and each tensor-parallel rank loads the rows of its own heads."""

    def __init__(self, local_heads: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.local_heads, self.out_features = local_heads, out_features
        self.weight = nn.Parameter(
            torch.empty(local_heads * out_features, in_features), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        rows = param.shape[0]
        start = get_tensor_model_parallel_rank() * rows
        param.data.copy_(loaded[start : start + rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., local_heads, in] -> [..., local_heads, out]."""
        weight = self.weight.view(self.local_heads, self.out_features, -1)
        return torch.einsum("...hi,hoi->...ho", x, weight)


class NormedQuery(nn.Module):
    """q_head_map(q_norm(q_head_proj(x))): the converted query of the local heads, flat."""

    def __init__(self, proj: ColumnParallelLinear, norm: RMSNorm, head_map: HeadwiseLinear):
        super().__init__()
        self._parts = (proj, norm, head_map)  # owned (and named) by the attention module

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        proj, norm, head_map = self._parts
        q = proj(x)[0].view(*x.shape[:-1], head_map.local_heads, -1)
        return head_map(norm(q)).flatten(-2), None


class NormedLatent(nn.Module):
    """kv_a_proj_with_mqa(x) + kv_a_key_map(k_norm(k_head_proj(x))): [latent; rope key]."""

    def __init__(
        self,
        kv_a_proj: ReplicatedLinear,
        key_proj: ReplicatedLinear,
        norm: RMSNorm,
        key_map: ReplicatedLinear,
        head_dim: int,
    ) -> None:
        super().__init__()
        self._parts = (kv_a_proj, key_proj, norm, key_map)  # owned by the attention module
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        kv_a_proj, key_proj, norm, key_map = self._parts
        keys = key_proj(x)[0]
        normed = norm(keys.view(*keys.shape[:-1], -1, self.head_dim)).view(keys.shape)
        return kv_a_proj(x)[0] + key_map(normed)[0], None


def add_normed_projections(
    attn: nn.Module,
    qk_norm: QKNorm,
    kv_a_proj: ReplicatedLinear,
    quant_config: QuantizationConfig | None,
    prefix: str,
) -> tuple[NormedQuery, NormedLatent]:
    """Create the normed attention's parameters on ``attn`` (served dims read from it) and
    return the two callables the MLA wrapper and the MHA fallback use as q / kv_a projections."""
    d = qk_norm.head_dim
    attn.q_head_proj = ColumnParallelLinear(
        attn.hidden_size,
        attn.num_heads * d,
        bias=False,
        quant_config=quant_config,
        prefix=f"{prefix}.q_head_proj",
    )
    attn.q_norm = RMSNorm(d, eps=qk_norm.eps)
    attn.q_head_map = HeadwiseLinear(attn.num_local_heads, d, attn.qk_head_dim)
    attn.k_head_proj = ReplicatedLinear(
        attn.hidden_size,
        qk_norm.key_width,
        bias=False,
        quant_config=quant_config,
        prefix=f"{prefix}.k_head_proj",
    )
    attn.k_norm = RMSNorm(d, eps=qk_norm.eps)
    attn.kv_a_key_map = ReplicatedLinear(
        qk_norm.key_width,
        attn.kv_lora_rank + attn.qk_rope_head_dim,
        bias=False,
        quant_config=quant_config,
        prefix=f"{prefix}.kv_a_key_map",
    )
    query = NormedQuery(attn.q_head_proj, attn.q_norm, attn.q_head_map)
    latent = NormedLatent(kv_a_proj, attn.k_head_proj, attn.k_norm, attn.kv_a_key_map, d)
    return query, latent
