"""Qwen3 and Qwen3-MoE: LLaMA layout plus per-head q/k RMSNorm before RoPE (converted through
the normed attention path, method.md section 5); attention_bias also biases o_proj; no sliding
window. Qwen3-MoE's experts and router are copied unchanged."""

from __future__ import annotations

from typing import Any

from converter.sources.adapter import FamilyAdapter
from transmla_vllm.checkpoint_format import MoEMLP


class Qwen3Adapter(FamilyAdapter):
    family = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)
    modeling_module = "transformers.models.qwen3.modeling_qwen3"
    layer_class = "Qwen3DecoderLayer"
    rotary_class = "Qwen3RotaryEmbedding"
    qk_norm = True

    def refuse_reasons(self, cfg: dict[str, Any]) -> list[str]:
        reasons = super().refuse_reasons(cfg)
        if cfg.get("attention_bias"):
            # Qwen3's attention_bias also puts a bias on o_proj, which MLA layers do not carry.
            reasons.append("attention_bias=true puts a bias on o_proj, which is not supported")
        if cfg.get("use_sliding_window"):
            reasons.append("it enables sliding-window attention (use_sliding_window=true)")
        return reasons

    def biases(self, cfg: dict[str, Any]) -> tuple[bool, bool, bool]:
        return False, False, False


class Qwen3MoeAdapter(Qwen3Adapter):
    """Qwen3-MoE: Qwen3's attention; the MLP of most layers is a mixture of experts with
    Qwen3's routing (softmax top-k, optional renormalisation), copied through unchanged."""

    family = "qwen3_moe"
    architectures = ("Qwen3MoeForCausalLM",)
    model_types = ("qwen3_moe",)
    modeling_module = "transformers.models.qwen3_moe.modeling_qwen3_moe"
    layer_class = "Qwen3MoeDecoderLayer"
    rotary_class = "Qwen3MoeRotaryEmbedding"

    def moe(self, cfg: dict[str, Any], num_layers: int) -> MoEMLP | None:
        experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        step = int(cfg.get("decoder_sparse_step") or 1)
        dense = set(cfg.get("mlp_only_layers") or [])
        sparse = tuple(
            i for i in range(num_layers) if experts and i not in dense and (i + 1) % step == 0
        )
        return MoEMLP(
            num_experts=experts,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
            sparse_layers=sparse,
        )

    def refuse_reasons(self, cfg: dict[str, Any]) -> list[str]:
        reasons = super().refuse_reasons(cfg)
        moe = self.moe(cfg, 0)
        assert moe is not None
        if moe.num_experts < 1 or moe.moe_intermediate_size < 1:
            reasons.append("its config has no num_experts / moe_intermediate_size")
        elif not 1 <= moe.num_experts_per_tok <= moe.num_experts:
            reasons.append(f"num_experts_per_tok {moe.num_experts_per_tok} is not in 1..experts")
        if cfg.get("shared_expert_intermediate_size"):
            reasons.append("it has a shared expert, which Qwen3-MoE's routing does not")
        return reasons
