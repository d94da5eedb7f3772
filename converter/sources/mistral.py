"""Mistral: LLaMA layout; only checkpoints without a sliding window (v0.2+) convert."""

from __future__ import annotations

from typing import Any

from converter.sources.adapter import FamilyAdapter


class MistralAdapter(FamilyAdapter):
    family = "mistral"
    architectures = ("MistralForCausalLM",)
    model_types = ("mistral",)
    modeling_module = "transformers.models.mistral.modeling_mistral"
    layer_class = "MistralDecoderLayer"
    rotary_class = "MistralRotaryEmbedding"

    def refuse_reasons(self, cfg: dict[str, Any]) -> list[str]:
        reasons = super().refuse_reasons(cfg)
        window = cfg.get("sliding_window")
        if window is not None and window < cfg.get("max_position_embeddings", 0):
            reasons.append(f"it uses a sliding window of {window} tokens")
        return reasons

    def biases(self, cfg: dict[str, Any]) -> tuple[bool, bool, bool]:
        return False, False, False
