"""LLaMA family (Llama-2/3/3.1/3.2, SmolLM2): the reference layout; optional attention_bias."""

from __future__ import annotations

from typing import Any

from converter.sources.adapter import FamilyAdapter


class LlamaAdapter(FamilyAdapter):
    family = "llama"
    architectures = ("LlamaForCausalLM",)
    model_types = ("llama",)
    modeling_module = "transformers.models.llama.modeling_llama"
    layer_class = "LlamaDecoderLayer"
    rotary_class = "LlamaRotaryEmbedding"

    def refuse_reasons(self, cfg: dict[str, Any]) -> list[str]:
        reasons = super().refuse_reasons(cfg)
        if cfg.get("attention_bias"):
            # LLaMA's attention_bias also puts a bias on o_proj, which MLA layers do not carry.
            reasons.append("attention_bias=true puts a bias on o_proj, which is not supported")
        return reasons
