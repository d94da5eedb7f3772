"""What the converter needs to know about a source model, read from its config.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from converter.errors import UnsupportedModelError


@dataclass(frozen=True)
class SourceSpec:
    """Geometry and quirks of a GQA source model (all families share HF LLaMA tensor names)."""

    family: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_parameters: dict[str, Any]
    tie_word_embeddings: bool
    q_bias: bool
    k_bias: bool
    v_bias: bool
    torch_dtype: str
    token_ids: dict[str, Any] = field(default_factory=dict)

    @property
    def kv_width(self) -> int:
        """L = G*d: width of the K (and of the V) half of the GQA cache."""
        return self.num_kv_heads * self.head_dim

    @property
    def kv_elements_per_token(self) -> int:
        return 2 * self.kv_width

    def attn_name(self, layer: int, proj: str, kind: str = "weight") -> str:
        return f"model.layers.{layer}.self_attn.{proj}.{kind}"


class FamilyAdapter:
    """Base adapter: subclasses set the names they accept and add family-specific checks."""

    family = ""
    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    # transformers classes that run one decoder layer of this family during calibration
    modeling_module = ""
    layer_class = ""
    rotary_class = ""

    def refuse_reasons(self, cfg: dict[str, Any]) -> list[str]:
        """Features of this config that cannot be converted, as user-facing sentences."""
        reasons = []
        if cfg.get("mlp_bias"):
            reasons.append("it has MLP biases (mlp_bias=true); the DeepSeek layout has none")
        if cfg.get("attn_logit_softcapping") or cfg.get("final_logit_softcapping"):
            reasons.append("it uses attention/logit softcapping")
        if any(k in cfg for k in ("num_local_experts", "num_experts")) and (
                cfg.get("num_local_experts") or cfg.get("num_experts")):
            reasons.append("it has a mixture-of-experts MLP")
        rope_type = (rope_parameters(cfg) or {}).get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            reasons.append(f"its rope_scaling type {rope_type!r} is not supported yet "
                           "(supported: none, linear, llama3)")
        return reasons

    def biases(self, cfg: dict[str, Any]) -> tuple[bool, bool, bool]:
        """(q, k, v) bias presence."""
        bias = bool(cfg.get("attention_bias", False))
        return bias, bias, bias


def rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """Normalise rope settings (legacy rope_theta + rope_scaling, or transformers-5
    rope_parameters) into one dict with rope_type and rope_theta."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling")
    if scaling:
        params.update(scaling)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.pop("type", None)
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", float(cfg.get("rope_theta", 10000.0)))
    return params


def adapter_for(family: str) -> FamilyAdapter:
    return next(a for a in _adapters() if a.family == family)


def _adapters() -> list[FamilyAdapter]:
    from converter.sources.llama import LlamaAdapter
    from converter.sources.mistral import MistralAdapter
    from converter.sources.qwen2 import Qwen2Adapter

    return [LlamaAdapter(), Qwen2Adapter(), MistralAdapter()]


KNOWN_REFUSALS = {
    "qwen3": "per-head q/k RMSNorm before RoPE (Qwen3) does not commute with the key rotation",
    "gemma3": "per-head q/k RMSNorm and sliding-window layers (Gemma-3) are not supported",
    "gemma2": "sliding-window layers and attention softcap (Gemma-2) are not supported",
    "deepseek_v2": "the source is already MLA (DeepSeek-V2); there is nothing to convert",
    "deepseek_v3": "the source is already MLA (DeepSeek-V3); there is nothing to convert",
    "kimi_k2": "the source is already MLA; there is nothing to convert",
    "mixtral": "mixture-of-experts MLPs (Mixtral) are not supported",
    "qwen2_moe": "mixture-of-experts MLPs (Qwen2-MoE) are not supported",
}


def inspect_source(cfg: dict[str, Any]) -> SourceSpec:
    """Validate a source config.json dict and describe it, or raise UnsupportedModelError."""
    model_type = cfg.get("model_type", "")
    archs = cfg.get("architectures") or []
    if model_type in KNOWN_REFUSALS:
        raise UnsupportedModelError(f"cannot convert model_type {model_type!r}: "
                                    f"{KNOWN_REFUSALS[model_type]}")
    adapter = next((a for a in _adapters() if model_type in a.model_types
                    or any(x in a.architectures for x in archs)), None)
    if adapter is None:
        raise UnsupportedModelError(
            f"unknown model_type {model_type!r} (architectures {archs}); supported families: "
            "LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM")
    reasons = adapter.refuse_reasons(cfg)
    if reasons:
        raise UnsupportedModelError(f"cannot convert this {adapter.family} model: "
                                    + "; ".join(reasons))
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise UnsupportedModelError(f"num_attention_heads {heads} is not a multiple of "
                                    f"num_key_value_heads {kv_heads}")
    if head_dim % 2:
        raise UnsupportedModelError(f"head_dim {head_dim} is odd; RoPE needs pairs")
    q_bias, k_bias, v_bias = adapter.biases(cfg)
    tokens = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
    return SourceSpec(
        family=adapter.family, architecture=(archs or [adapter.architectures[0]])[0],
        hidden_size=hidden, num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope_parameters=rope_parameters(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        q_bias=q_bias, k_bias=k_bias, v_bias=v_bias, torch_dtype=dtype, token_ids=tokens)
