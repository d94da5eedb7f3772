"""The converted checkpoint format: the one place that knows DeepSeek names and fields.

The converter writes it, the vLLM plugin and the transformers remote code read it. It is the
DeepSeek-V2/V3 dense layout (``model_type: deepseek_v3`` so vLLM switches MLA on) with three
differences recorded in the ``transmla`` block: no latent RMSNorm, optional q / kv_a biases, and
the source model's rope scaling kept as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FORMAT_VERSION = 1
ARCHITECTURE = "TransMLAForCausalLM"
MODEL_TYPE = "deepseek_v3"
REMOTE_CODE_FILE = "modeling_transmla.py"
AUTO_MAP = {"AutoModelForCausalLM": "modeling_transmla.TransMLAForCausalLM"}
# rope types whose frequency law is a function of (theta, dim) only, so an r-dim rope keeps the
# source's meaning exactly (see method.md section 2).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class LatentDims:
    """Per-layer MLA dims, of a checkpoint or of what a backend serves (the plugin pads)."""

    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int

    @property
    def kv_elements_per_token(self) -> int:
        """Cache elements per token per layer: one latent plus one shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class MLAShape(LatentDims):
    """Attention geometry of a converted model: its latent dims plus width and heads."""

    hidden_size: int
    num_heads: int

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


ATTN_TENSORS = (
    "self_attn.q_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight",
    "self_attn.kv_b_proj.weight",
    "self_attn.o_proj.weight",
)
Q_BIAS = "self_attn.q_proj.bias"
KV_A_BIAS = "self_attn.kv_a_proj_with_mqa.bias"
DENSE_TENSORS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
FORBIDDEN_SUFFIXES = ("kv_a_layernorm.weight", "q_a_layernorm.weight")


def build_config(
    *,
    shape: MLAShape,
    vocab_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    rms_norm_eps: float,
    max_position_embeddings: int,
    rope_parameters: dict[str, Any],
    tie_word_embeddings: bool,
    q_bias: bool,
    kv_a_bias: bool,
    dtype: str,
    token_ids: dict[str, Any],
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """The config.json dict of a converted model (every field vLLM and transformers read)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "auto_map": dict(AUTO_MAP),
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": intermediate_size,
        "moe_intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_heads,
        "n_routed_experts": 0,
        "n_shared_experts": 0,
        "first_k_dense_replace": num_hidden_layers,
        "num_nextn_predict_layers": 0,
        "q_lora_rank": None,
        "kv_lora_rank": shape.kv_lora_rank,
        "qk_rope_head_dim": shape.qk_rope_head_dim,
        "qk_nope_head_dim": shape.qk_nope_head_dim,
        "v_head_dim": shape.v_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": rms_norm_eps,
        "max_position_embeddings": max_position_embeddings,
        "rope_theta": rope_parameters["rope_theta"],
        "rope_parameters": dict(rope_parameters),
        "rope_interleave": True,
        "attention_bias": bool(q_bias or kv_a_bias),
        "attention_dropout": 0.0,
        "tie_word_embeddings": tie_word_embeddings,
        "dtype": dtype,
        "use_cache": True,
        **token_ids,
        "transmla": {
            "format_version": FORMAT_VERSION,
            "q_bias": bool(q_bias),
            "kv_a_bias": bool(kv_a_bias),
            "latent_norm": False,
            "rope_layout": "interleaved",
            **provenance,
        },
    }


def shape_from_config(cfg: Any) -> MLAShape:
    """Read the MLA geometry from a config dict or object, naming any missing field."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    fields = ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim",
              "qk_nope_head_dim", "v_head_dim")
    missing = [f for f in fields if get(f) is None]
    if missing:
        raise ValueError(f"config is missing MLA field(s) {missing}; this is not a converted "
                         "TransMLA checkpoint or its config.json was damaged")
    return MLAShape(kv_lora_rank=get("kv_lora_rank"), qk_rope_head_dim=get("qk_rope_head_dim"),
                    qk_nope_head_dim=get("qk_nope_head_dim"), v_head_dim=get("v_head_dim"),
                    hidden_size=get("hidden_size"), num_heads=get("num_attention_heads"))
