"""inspect_source: a config.json dict in, a SourceSpec or a sentence saying why not out. The
order of the checks is the order of the messages a user with several problems sees first."""

from __future__ import annotations

from typing import Any

from converter.errors import ConversionError, UnsupportedModelError
from converter.sources.adapter import FamilyAdapter
from converter.sources.refusals import refuse, refuse_features, refuse_known_kinds
from converter.sources.registry import adapter_matching
from converter.sources.spec import SourceSpec, rope_parameters


def inspect_source(cfg: dict[str, Any]) -> SourceSpec:
    """Validate a source config.json dict and describe it, or raise UnsupportedModelError."""
    if not isinstance(cfg, dict):
        raise ConversionError(
            f"config.json holds a {type(cfg).__name__}, not an object; pass "
            "a transformers model folder"
        )
    refuse_known_kinds(cfg)
    adapter = _family(cfg)
    refuse_features(adapter, cfg)
    hidden, heads, kv_heads, head_dim = _attention_geometry(cfg)
    q_bias, k_bias, v_bias = adapter.biases(cfg)
    num_layers = _positive_int(cfg, "num_hidden_layers")
    tokens = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
    eps, max_pos = _norm_eps_and_max_positions(cfg)
    archs = cfg.get("architectures") or []
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


def _family(cfg: dict[str, Any]) -> FamilyAdapter:
    """The adapter of the config's family, or a refusal naming what the config claims."""
    model_type = cfg.get("model_type", "")
    archs = cfg.get("architectures") or []
    adapter = adapter_matching(model_type, archs)
    if adapter is None:
        raise refuse(f"unknown model_type {model_type!r} (architectures {archs})")
    return adapter


def _attention_geometry(cfg: dict[str, Any]) -> tuple[int, int, int, int]:
    """(hidden_size, heads, kv_heads, head_dim) of a valid GQA attention with RoPE pairs."""
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
    return hidden, heads, kv_heads, head_dim


def _norm_eps_and_max_positions(cfg: dict[str, Any]) -> tuple[float, int]:
    """rms_norm_eps and max_position_embeddings, with their transformers defaults."""
    try:
        return float(cfg.get("rms_norm_eps", 1e-6)), int(cfg.get("max_position_embeddings", 4096))
    except (TypeError, ValueError) as exc:
        raise ConversionError(
            f"config.json has an invalid rms_norm_eps or "
            f"max_position_embeddings ({exc}); fix the config"
        ) from exc


def _positive_int(cfg: dict[str, Any], key: str, default: Any = None) -> int:
    """cfg[key] as a positive int (an integral float is accepted), else a ConversionError
    that names the key."""
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
