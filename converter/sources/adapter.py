"""The family adapter base class: the config quirks every supported family shares. Each family
module subclasses it; nothing here knows which families exist (that is the registry's job), so
adapters import this module and never the registry."""

from __future__ import annotations

from typing import Any

from converter.sources.spec import rope_parameters
from transmla_vllm.checkpoint_format import SUPPORTED_ROPE_TYPES, MoEMLP

# Config keys that announce a feature the DeepSeek layout (or this family) has no place for.
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
QK_NORM_KEYS = ("use_qk_norm", "qk_layernorm", "qk_norm")
# Refusals call "default" "none": a config with plain RoPE has no rope_scaling at all.
_ROPE_NAMES = ", ".join("none" if t == "default" else t for t in SUPPORTED_ROPE_TYPES)


class FamilyAdapter:
    """Base adapter: subclasses set the names they accept and add family-specific checks."""

    family = ""
    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    # transformers classes that run one decoder layer of this family during calibration
    modeling_module = ""
    layer_class = ""
    rotary_class = ""
    qk_norm = False  # per-head q/k RMSNorm before RoPE (converted through the normed path)

    def moe(self, cfg: dict[str, Any], num_layers: int) -> MoEMLP | None:
        """The mixture-of-experts MLP the family's config describes (None: dense MLPs)."""
        return None

    def refuse_reasons(self, cfg: dict[str, Any]) -> list[str]:
        """Features of this config that cannot be converted, as user-facing sentences."""
        reasons = []
        if cfg.get("mlp_bias"):
            reasons.append("it has MLP biases (mlp_bias=true); the DeepSeek layout has none")
        if cfg.get("attn_logit_softcapping") or cfg.get("final_logit_softcapping"):
            reasons.append("it uses attention/logit softcapping")
        if self.moe(cfg, 0) is None and any(cfg.get(k) for k in MOE_KEYS):
            reasons.append("it has a mixture-of-experts MLP")
        if not self.qk_norm and any(cfg.get(k) for k in QK_NORM_KEYS):
            reasons.append(
                "it has per-head q/k RMSNorm, which does not commute with the key rotation"
            )
        act = cfg.get("hidden_act") or "silu"
        if act not in ("silu", "swish"):
            reasons.append(
                f"its MLP activation is {act!r}; the converted model (DeepSeek layout) uses SiLU"
            )
        layer_types = cfg.get("layer_types") or []
        windowed = sorted({t for t in layer_types if t != "full_attention"})
        if windowed:
            reasons.append(
                f"some layers use {', '.join(map(repr, windowed))} (only full attention converts)"
            )
        params = rope_parameters(cfg)
        rope_type = params.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            reasons.append(
                f"its rope_scaling type {rope_type!r} is not supported yet "
                f"(supported: {_ROPE_NAMES})"
            )
        partial = cfg.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            reasons.append(f"RoPE covers only part of each head (partial_rotary_factor {partial})")
        return reasons

    def biases(self, cfg: dict[str, Any]) -> tuple[bool, bool, bool]:
        """(q, k, v) bias presence."""
        bias = bool(cfg.get("attention_bias", False))
        return bias, bias, bias
