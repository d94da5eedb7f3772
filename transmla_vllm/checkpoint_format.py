"""The converted checkpoint format: the one home of its file names, tensor names, shapes and
writing order, and config fields.

The converter writes it; the vLLM plugin's load checks, Hub validation and the transformers
remote code read it. It is the DeepSeek-V2/V3 dense layout (``model_type: deepseek_v3`` so vLLM
switches MLA on) with three differences recorded in the ``transmla`` block: no latent RMSNorm,
optional q / kv_a biases, and the source model's rope scaling kept as is. Pure Python (no vLLM
import), so the converter can use it anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FORMAT_VERSION = 1
ARCHITECTURE = "TransMLAForCausalLM"
MODEL_TYPE = "deepseek_v3"

# File names in a converted folder (the safetensors ones are also what sources use).
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
REPORT_FILE = "transmla_report.json"
CARD_FILE = "README.md"
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


# Tensor names. Per-layer names are relative to ``layer_prefix(i)``.
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
Q_PROJ = "self_attn.q_proj.weight"
Q_BIAS = "self_attn.q_proj.bias"
KV_A_PROJ = "self_attn.kv_a_proj_with_mqa.weight"
KV_A_BIAS = "self_attn.kv_a_proj_with_mqa.bias"
KV_B_PROJ = "self_attn.kv_b_proj.weight"
O_PROJ = "self_attn.o_proj.weight"
INPUT_NORM = "input_layernorm.weight"
POST_ATTN_NORM = "post_attention_layernorm.weight"
GATE_PROJ = "mlp.gate_proj.weight"
UP_PROJ = "mlp.up_proj.weight"
DOWN_PROJ = "mlp.down_proj.weight"
# Writing order within a layer: attention (biases only where the config has them), then the
# tensors the conversion copies from the source unchanged.
ATTN_TENSORS = (Q_PROJ, Q_BIAS, KV_A_PROJ, KV_A_BIAS, KV_B_PROJ, O_PROJ)
DENSE_TENSORS = (INPUT_NORM, POST_ATTN_NORM, GATE_PROJ, UP_PROJ, DOWN_PROJ)
# DeepSeek tensors a converted checkpoint must never carry (the conversion is exact only
# without a latent or query norm).
FORBIDDEN_SUFFIXES = ("kv_a_layernorm.weight", "q_a_layernorm.weight")
# Tensors a reader skips: rope caches some older writers saved as buffers (no weights).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def _getter(cfg: Any):
    return cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))


def transmla_block(cfg: Any) -> dict[str, Any]:
    """The config's ``transmla`` provenance block (empty if absent)."""
    block = _getter(cfg)("transmla")
    return dict(block) if isinstance(block, dict) else {}


def biases(cfg: Any) -> tuple[bool, bool]:
    """(q_proj bias, kv_a_proj_with_mqa bias) of a converted config (dict or object)."""
    block = transmla_block(cfg)
    default = bool(_getter(cfg)("attention_bias", False))
    return bool(block.get("q_bias", default)), bool(block.get("kv_a_bias", default))


@dataclass(frozen=True)
class CheckpointLayout:
    """Which tensors a converted checkpoint holds, with their shapes, in writing order."""

    shape: MLAShape
    vocab_size: int
    intermediate_size: int
    num_layers: int
    tie_word_embeddings: bool
    q_bias: bool
    kv_a_bias: bool

    def attention_shapes(self) -> dict[str, tuple[int, ...]]:
        """Layer-relative attention tensors (compact: any padding happens at load)."""
        s = self.shape
        d, heads = s.hidden_size, s.num_heads
        q_rows, kv_a_rows = heads * s.q_head_dim, s.kv_elements_per_token
        every = {
            Q_PROJ: (q_rows, d),
            Q_BIAS: (q_rows,),
            KV_A_PROJ: (kv_a_rows, d),
            KV_A_BIAS: (kv_a_rows,),
            KV_B_PROJ: (heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank),
            O_PROJ: (d, heads * s.v_head_dim),
        }
        absent = {Q_BIAS} if not self.q_bias else set()
        absent |= {KV_A_BIAS} if not self.kv_a_bias else set()
        return {n: every[n] for n in ATTN_TENSORS if n not in absent}

    def dense_shapes(self) -> dict[str, tuple[int, ...]]:
        """Layer-relative tensors copied from the source."""
        d, inter = self.shape.hidden_size, self.intermediate_size
        shapes = ((d,), (d,), (inter, d), (inter, d), (d, inter))
        return dict(zip(DENSE_TENSORS, shapes, strict=True))

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the checkpoint by full name, in writing order."""
        d = self.shape.hidden_size
        out = {EMBED: (self.vocab_size, d)}
        per_layer = {**self.attention_shapes(), **self.dense_shapes()}
        for i in range(self.num_layers):
            out.update({layer_prefix(i) + n: s for n, s in per_layer.items()})
        out[FINAL_NORM] = (d,)
        if not self.tie_word_embeddings:
            out[LM_HEAD] = (self.vocab_size, d)
        return out

    @classmethod
    def from_config(cls, cfg: Any, dims: LatentDims | None = None) -> CheckpointLayout:
        """The layout a config (dict or object) implies; ``dims`` overrides its latent dims
        (the plugin's config already holds the padded, served ones)."""
        get = _getter(cfg)
        shape = shape_from_config(cfg)
        if dims is not None:
            shape = MLAShape(**{**vars(shape), **vars(dims)})
        q_bias, kv_a_bias = biases(cfg)
        return cls(
            shape=shape,
            vocab_size=int(get("vocab_size")),
            intermediate_size=int(get("intermediate_size")),
            num_layers=int(get("num_hidden_layers")),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            q_bias=q_bias,
            kv_a_bias=kv_a_bias,
        )


def build_config(
    *,
    layout: CheckpointLayout,
    rms_norm_eps: float,
    max_position_embeddings: int,
    rope_parameters: dict[str, Any],
    dtype: str,
    token_ids: dict[str, Any],
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """The config.json dict of a converted model (every field vLLM and transformers read)."""
    shape, num_hidden_layers = layout.shape, layout.num_layers
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "auto_map": dict(AUTO_MAP),
        "vocab_size": layout.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": layout.intermediate_size,
        "moe_intermediate_size": layout.intermediate_size,
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
        "attention_bias": layout.q_bias or layout.kv_a_bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": layout.tie_word_embeddings,
        "dtype": dtype,
        "use_cache": True,
        **token_ids,
        "transmla": {
            "format_version": FORMAT_VERSION,
            "q_bias": layout.q_bias,
            "kv_a_bias": layout.kv_a_bias,
            "latent_norm": False,
            "rope_layout": "interleaved",
            **provenance,
        },
    }


def shape_from_config(cfg: Any) -> MLAShape:
    """Read the MLA geometry from a config dict or object, naming any missing field."""
    get = _getter(cfg)
    fields = (
        "hidden_size",
        "num_attention_heads",
        "kv_lora_rank",
        "qk_rope_head_dim",
        "qk_nope_head_dim",
        "v_head_dim",
    )
    missing = [f for f in fields if get(f) is None]
    if missing:
        raise ValueError(
            f"config is missing MLA field(s) {missing}; this is not a converted "
            "TransMLA checkpoint or its config.json was damaged"
        )
    return MLAShape(
        kv_lora_rank=get("kv_lora_rank"),
        qk_rope_head_dim=get("qk_rope_head_dim"),
        qk_nope_head_dim=get("qk_nope_head_dim"),
        v_head_dim=get("v_head_dim"),
        hidden_size=get("hidden_size"),
        num_heads=get("num_attention_heads"),
    )
