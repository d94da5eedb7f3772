"""What the converter needs to know about a source model, read from its config.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from converter.errors import ConversionError, UnsupportedModelError
from transmla_vllm.checkpoint_format import (
    DOWN_PROJ,
    EMBED,
    EXPERT_PARTS,
    FINAL_NORM,
    GATE_PROJ,
    LM_HEAD,
    ROUTER,
    UP_PROJ,
    MoEMLP,
    expert_tensor,
    layer_prefix,
)


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
    qk_norm: bool = False  # per-head q/k RMSNorm before RoPE (Qwen3): the normed attention path
    moe: MoEMLP | None = None  # Qwen3-MoE experts (copied unchanged); None: dense MLPs only

    @property
    def kv_width(self) -> int:
        """L = G*d: width of the K (and of the V) half of the GQA cache."""
        return self.num_kv_heads * self.head_dim

    @property
    def kv_elements_per_token(self) -> int:
        return 2 * self.kv_width


# Source tensor names (HF LLaMA layout, shared by every supported family), relative to
# model.layers.{i}.; biases only where the config has them.
SOURCE_LAYER_TENSORS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
)


def source_layer_tensors(spec: SourceSpec, layer: int = 0) -> dict[str, tuple[int, ...]]:
    """Layer-relative tensors layer ``layer`` of a source with this config must hold, with
    their shapes (a mixture-of-experts layer holds the router and experts, named as in the
    converted format, instead of the dense MLP)."""
    D, H, G, d = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    inter = spec.intermediate_size
    shapes = dict(
        zip(
            SOURCE_LAYER_TENSORS,
            [
                (D,),
                (D,),
                (inter, D),
                (inter, D),
                (D, inter),
                (H * d, D),
                (G * d, D),
                (G * d, D),
                (D, H * d),
                (H * d,),
                (G * d,),
                (G * d,),
                (d,),
                (d,),
            ],
            strict=True,
        )
    )
    absent = {
        f"self_attn.{p}_proj.bias"
        for p, has in (("q", spec.q_bias), ("k", spec.k_bias), ("v", spec.v_bias))
        if not has
    }
    if not spec.qk_norm:
        absent |= {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}
    out = {n: s for n, s in shapes.items() if n not in absent}
    if spec.moe is not None and layer in spec.moe.sparse_layers:
        moe, inter_e = spec.moe, spec.moe.moe_intermediate_size
        for name in (GATE_PROJ, UP_PROJ, DOWN_PROJ):
            del out[name]
        out[ROUTER] = (moe.num_experts, D)
        for e in range(moe.num_experts):
            parts = ((inter_e, D), (inter_e, D), (D, inter_e))
            out.update({expert_tensor(e, p): s for p, s in zip(EXPERT_PARTS, parts, strict=True)})
    return out


def source_tensors(spec: SourceSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor a source with this config must hold, with its shape."""
    D = spec.hidden_size
    out = {EMBED: (spec.vocab_size, D), FINAL_NORM: (D,)}
    if not spec.tie_word_embeddings:
        out[LM_HEAD] = (spec.vocab_size, D)
    for i in range(spec.num_layers):
        out.update({layer_prefix(i) + k: v for k, v in source_layer_tensors(spec, i).items()})
    return out


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
        params = rope_parameters(cfg) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            reasons.append(
                f"its rope_scaling type {rope_type!r} is not supported yet "
                "(supported: none, linear, llama3)"
            )
        partial = cfg.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            reasons.append(f"RoPE covers only part of each head (partial_rotary_factor {partial})")
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
    from converter.sources.qwen3 import Qwen3Adapter, Qwen3MoeAdapter

    return [LlamaAdapter(), Qwen2Adapter(), MistralAdapter(), Qwen3Adapter(), Qwen3MoeAdapter()]


SUPPORTED = (
    "full-attention LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, Qwen3ForCausalLM "
    "or Qwen3MoeForCausalLM checkpoints convert (see README)"
)
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
QK_NORM_KEYS = ("use_qk_norm", "qk_layernorm", "qk_norm")
_QK_NORM = "per-head q/k RMSNorm before RoPE ({}) does not commute with the key rotation"
_WINDOW = "sliding-window layers ({}) are not supported"
_MOE = "mixture-of-experts MLPs ({}) are not supported"
_MLA = "the source is already MLA ({}); there is nothing to convert, serve it as it is"
KNOWN_REFUSALS = {
    "gemma3": "per-head q/k RMSNorm and sliding-window layers (Gemma-3) are not supported",
    "gemma3_text": "per-head q/k RMSNorm and sliding-window layers (Gemma-3) are not supported",
    "gemma2": "sliding-window layers and attention softcap (Gemma-2) are not supported",
    "gemma": "Gemma's GeLU MLP and (1 + w) RMSNorm weights are not supported",
    "olmo2": _QK_NORM.format("OLMo-2"),
    "cohere2": _WINDOW.format("Cohere2"),
    "deepseek_v2": _MLA.format("DeepSeek-V2"),
    "deepseek_v3": _MLA.format("DeepSeek-V3"),
    "kimi_k2": _MLA.format("Kimi-K2"),
    "mixtral": _MOE.format("Mixtral"),
    "qwen2_moe": _MOE.format("Qwen2-MoE"),
    "olmoe": _MOE.format("OLMoE"),
    "dbrx": _MOE.format("DBRX"),
}


def _refuse(sentence: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{sentence}; only {SUPPORTED}")


def _positive_int(cfg: dict[str, Any], key: str, default: Any = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        if isinstance(value, float) and value.is_integer() and value > 0:
            return int(value)
        problem = "has no" if value is None else f"has {value!r} as"
        raise ConversionError(
            f"config.json {problem} {key!r}, which must be a positive "
            "integer; pass a complete transformers model folder"
        )
    return value


def _already_mla(cfg: dict[str, Any]) -> bool:
    archs = cfg.get("architectures") or []
    return (
        "kv_lora_rank" in cfg
        or "transmla" in cfg
        or any(str(a).startswith(("Deepseek", "TransMLA")) for a in archs)
    )


def inspect_source(cfg: dict[str, Any]) -> SourceSpec:
    """Validate a source config.json dict and describe it, or raise UnsupportedModelError."""
    if not isinstance(cfg, dict):
        raise ConversionError(
            f"config.json holds a {type(cfg).__name__}, not an object; pass "
            "a transformers model folder"
        )
    model_type = cfg.get("model_type", "")
    archs = cfg.get("architectures") or []
    if model_type in KNOWN_REFUSALS:
        reason = KNOWN_REFUSALS[model_type]
        sentence = f"cannot convert model_type {model_type!r}: {reason}"
        raise (UnsupportedModelError(sentence) if "already MLA" in reason else _refuse(sentence))
    if _already_mla(cfg):
        raise UnsupportedModelError(
            f"cannot convert model_type {model_type!r} (architectures {archs}): it is already "
            "MLA (kv_lora_rank or an MLA architecture in its config); serve it as it is"
        )
    quant = cfg.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise UnsupportedModelError(
            f"cannot convert a quantized checkpoint (quant_method "
            f"{method!r}); convert the bf16/fp16 original instead"
        )
    adapter = next(
        (
            a
            for a in _adapters()
            if model_type in a.model_types or any(x in a.architectures for x in archs)
        ),
        None,
    )
    if adapter is None:
        raise _refuse(f"unknown model_type {model_type!r} (architectures {archs})")
    reasons = adapter.refuse_reasons(cfg)
    if reasons:
        raise _refuse(f"cannot convert this {adapter.family} model: " + "; ".join(reasons))
    heads = _positive_int(cfg, "num_attention_heads")
    kv_heads = _positive_int(cfg, "num_key_value_heads", cfg.get("num_key_value_heads") or heads)
    hidden = _positive_int(cfg, "hidden_size")
    if not cfg.get("head_dim") and hidden % heads:
        raise ConversionError(
            f"hidden_size {hidden} is not a multiple of num_attention_heads "
            f"{heads} and config.json has no head_dim; fix the config"
        )
    head_dim = _positive_int(cfg, "head_dim", cfg.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise UnsupportedModelError(
            f"num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv_heads}; the config is not a "
            "valid grouped-query attention model"
        )
    if head_dim % 2:
        raise UnsupportedModelError(
            f"head_dim {head_dim} is odd; RoPE needs pairs, so this model cannot be converted"
        )
    q_bias, k_bias, v_bias = adapter.biases(cfg)
    num_layers = _positive_int(cfg, "num_hidden_layers")
    tokens = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
    try:
        eps = float(cfg.get("rms_norm_eps", 1e-6))
        max_pos = int(cfg.get("max_position_embeddings", 4096))
    except (TypeError, ValueError) as exc:
        raise ConversionError(
            f"config.json has an invalid rms_norm_eps or "
            f"max_position_embeddings ({exc}); fix the config"
        ) from exc
    return SourceSpec(
        family=adapter.family,
        architecture=(archs or [adapter.architectures[0]])[0],
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=_positive_int(cfg, "intermediate_size"),
        vocab_size=_positive_int(cfg, "vocab_size"),
        rms_norm_eps=eps,
        max_position_embeddings=max_pos,
        rope_parameters=rope_parameters(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        q_bias=q_bias,
        k_bias=k_bias,
        v_bias=v_bias,
        torch_dtype=dtype,
        token_ids=tokens,
        qk_norm=adapter.qk_norm,
        moe=adapter.moe(cfg, num_layers),
    )
