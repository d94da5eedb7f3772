"""Qwen2 / Qwen2.5: q, k and v always carry a bias (o_proj does not); no sliding window."""

from __future__ import annotations

from typing import Any

from converter.sources.adapter import FamilyAdapter


class Qwen2Adapter(FamilyAdapter):
    family = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)
    modeling_module = "transformers.models.qwen2.modeling_qwen2"
    layer_class = "Qwen2DecoderLayer"
    rotary_class = "Qwen2RotaryEmbedding"

    def refuse_reasons(self, cfg: dict[str, Any]) -> list[str]:
        reasons = super().refuse_reasons(cfg)
        if cfg.get("use_sliding_window"):
            reasons.append("it enables sliding-window attention (use_sliding_window=true)")
        return reasons

    def biases(self, cfg: dict[str, Any]) -> tuple[bool, bool, bool]:
        return True, True, True
