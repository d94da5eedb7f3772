"""Refuse configs the plugin cannot serve, naming the field, before any engine starts.

transformers' ``DeepseekV3Config`` fills missing MLA fields with DeepSeek defaults, so a
damaged config.json would otherwise load as a different model; hence the raw file is read too.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from transmla_vllm.checkpoint_format import (
    CONFIG_FILE,
    FORMAT_VERSION,
    MLP_KEY,
    QK_NORM_KEY,
    SUPPORTED_ROPE_TYPES,
    LatentDims,
    moe_mlp,
    qk_norm,
    transmla_block,
)

if TYPE_CHECKING:
    from vllm.config import ModelConfig

_REQUIRED_DIMS = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
# Keys of each supported rope law passed on to vLLM's get_rope (besides type and theta).
_ROPE_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def raw_config(model_config: ModelConfig | None) -> dict[str, Any] | None:
    """config.json as written, to tell missing fields from transformers defaults."""
    if model_config is None:
        return None
    path = os.path.join(str(model_config.model), CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def validate_config(hf_config: Any, raw: dict[str, Any] | None = None) -> LatentDims:
    """Refuse configs this architecture cannot serve; return the checkpoint's (source) dims.

    ``raw`` is the unparsed config.json when available (see the module docstring).
    """
    for name in _REQUIRED_DIMS:
        value = getattr(hf_config, name, None)
        if raw is not None and name not in raw:
            value = None
        if not isinstance(value, int) or value <= 0:
            raise ValueError(
                f"TransMLA config field '{name}' is missing or not a positive "
                f"integer (found {value!r}); the converter must write it."
            )
    if getattr(hf_config, "q_lora_rank", None) is not None:
        raise ValueError(
            "TransMLA config field 'q_lora_rank' must be null: this plugin serves "
            f"a full-rank q_proj only (found {hf_config.q_lora_rank!r})."
        )
    n_experts = getattr(hf_config, "n_routed_experts", 0) or 0
    if n_experts > 0:
        raise ValueError(
            f"TransMLA config field 'n_routed_experts' is {n_experts}: DeepSeek MoE MLPs are "
            f"not supported, it must be 0 (Qwen3-MoE experts are described in "
            f"'transmla.{MLP_KEY}')."
        )
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"TransMLA config field 'hidden_act' must be 'silu', not {act!r}.")
    block = transmla_block(hf_config)
    version = block.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"TransMLA config field 'transmla.format_version' is {version!r}; this "
            f"plugin reads version {FORMAT_VERSION}. Use a matching transmla_vllm."
        )
    if block.get("latent_norm", False):
        raise ValueError(
            "TransMLA config field 'transmla.latent_norm' is true, but this format "
            "has no latent RMSNorm (kv_a_layernorm); reconvert the checkpoint."
        )
    layout = block.get("rope_layout", "interleaved")
    if layout != "interleaved" or not getattr(hf_config, "rope_interleave", True):
        raise ValueError(
            "TransMLA config field 'transmla.rope_layout' must be 'interleaved' and "
            f"'rope_interleave' true (found {layout!r}, "
            f"{getattr(hf_config, 'rope_interleave', None)!r})."
        )
    rope = hf_config.qk_rope_head_dim
    if rope % 2:
        raise ValueError(f"TransMLA config field 'qk_rope_head_dim' must be even (found {rope}).")
    heads = getattr(hf_config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"TransMLA config field 'num_attention_heads' is invalid ({heads!r}).")
    rope_parameters_for(hf_config)  # raises on an unsupported rope_type
    try:
        normed = qk_norm(hf_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"TransMLA config field 'transmla.{QK_NORM_KEY}' is malformed ({exc!r}); it needs "
            "num_kv_heads, head_dim and eps. Reconvert the checkpoint."
        ) from None
    try:
        moe = moe_mlp(hf_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"TransMLA config field 'transmla.{MLP_KEY}' is malformed ({exc!r}). Reconvert."
        ) from None
    if moe is not None and not 1 <= moe.num_experts_per_tok <= moe.num_experts:
        raise ValueError(f"TransMLA config field 'transmla.{MLP_KEY}' is inconsistent ({moe}).")
    if normed is not None and min(normed.num_kv_heads, normed.head_dim) <= 0:
        raise ValueError(
            f"TransMLA config field 'transmla.{QK_NORM_KEY}' has a non-positive size ({normed})."
        )
    return LatentDims(
        kv_lora_rank=hf_config.kv_lora_rank,
        qk_rope_head_dim=rope,
        qk_nope_head_dim=hf_config.qk_nope_head_dim,
        v_head_dim=hf_config.v_head_dim,
    )


def rope_parameters_for(hf_config: Any) -> dict[str, Any]:
    """Clean rope_parameters for vLLM's get_rope: the source's own scaling law.

    Only the keys of the supported laws are passed on, so that neither a stray
    ``partial_rotary_factor`` nor DeepSeek-YaRN keys change the rope.
    """
    params = getattr(hf_config, "rope_parameters", None) or {}
    if not params and getattr(hf_config, "rope_scaling", None):
        params = dict(hf_config.rope_scaling)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"TransMLA config field 'rope_parameters.rope_type' is {rope_type!r}; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)} (laws that depend on "
            "the frequency only, so an r-dim rope keeps the source's positions)."
        )
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError("TransMLA config field 'rope_parameters.rope_theta' is missing.")
    clean: dict[str, Any] = {"rope_type": rope_type, "rope_theta": float(theta)}
    for key in _ROPE_KEYS.get(rope_type, ()):
        if key not in params:
            raise ValueError(
                f"TransMLA config field 'rope_parameters.{key}' is required for "
                f"rope_type {rope_type!r}."
            )
        clean[key] = params[key]
    return clean
