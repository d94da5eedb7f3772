"""The Qwen3-MoE MLP of converted Qwen3-MoE checkpoints, on vLLM's own fused MoE layer.

Built as vLLM's ``qwen3_moe.Qwen3MoeSparseMoeBlock`` builds it (``GateLinear`` router,
``FusedMoEFactory`` experts, softmax top-k routing with ``renormalize = norm_topk_prob``, no
shared expert), but from the ``transmla.mlp`` block of our config (``checkpoint_format.MoEMLP``)
instead of Qwen3-MoE's config fields, which a DeepSeek-typed config does not carry. The experts
are loaded by the fused layer's own ``load_weights`` (per-expert checkpoint names, tensor and
expert parallel aware).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
)
from vllm.model_executor.layers.fused_moe import FusedMoEFactory, GateLinear
from vllm.model_executor.models.utils import sequence_parallel_chunk

from transmla_vllm.checkpoint_format import MoEMLP

# The MLP module of a decoder layer, and the layer-relative prefix of the expert tensors
# (``mlp.experts.{e}.{part}.weight``, checkpoint_format.expert_tensor).
MLP_MODULE = "mlp"
EXPERTS_PREFIX = f"{MLP_MODULE}.experts."


class TransMLAQwen3MoE(nn.Module):
    """Router + fused experts; [tokens, hidden] -> [tokens, hidden] (all-reduced under TP)."""

    def __init__(self, vllm_config: VllmConfig, moe: MoEMLP, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        parallel = vllm_config.parallel_config
        if get_tensor_model_parallel_world_size() > moe.num_experts:
            raise ValueError(
                f"tensor_parallel_size {get_tensor_model_parallel_world_size()} is greater "
                f"than the number of experts {moe.num_experts}."
            )
        self.gate = GateLinear(
            config.hidden_size,
            moe.num_experts,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.gate",
        )
        self.experts = FusedMoEFactory(
            gate=self.gate,
            num_experts=moe.num_experts,
            top_k=moe.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=moe.moe_intermediate_size,
            renormalize=moe.norm_topk_prob,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.experts",
            enable_eplb=parallel.enable_eplb,
            num_redundant_experts=parallel.eplb_config.num_redundant_experts,
            is_sequence_parallel=parallel.use_sequence_parallel_moe,
        )

        self.is_sequence_parallel = parallel.use_sequence_parallel_moe

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.shape[0]
        if self.is_sequence_parallel:  # as vLLM's Qwen3-MoE block: each rank routes a chunk
            hidden_states = sequence_parallel_chunk(hidden_states)
        # the fused layer runs the router itself (it was given ``gate``)
        out = self.experts(hidden_states=hidden_states, router_logits=hidden_states)
        if self.is_sequence_parallel:
            out = tensor_model_parallel_all_gather(out, 0)[:tokens]
        return out

    def load_experts(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load ``(expert-relative name, tensor)`` pairs (``{e}.{part}.weight``); returns the
        parameter names set, relative to this module."""
        return {f"experts.{name}" for name in self.experts.load_weights(weights)}
