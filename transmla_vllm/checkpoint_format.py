"""The converted checkpoint format: the one home of its file names, tensor names, shapes and
writing order, and config fields.

The converter writes it; the vLLM plugin's load checks, Hub validation and the transformers
remote code read it. It is the DeepSeek-V2/V3 dense layout (``model_type: deepseek_v3`` so vLLM
switches MLA on) with three differences recorded in the ``transmla`` block: no latent RMSNorm,
optional q / kv_a biases, and the source model's rope scaling kept as is. Sources with per-head
q/k RMSNorm (Qwen3) add the normed attention tensors below and a ``qk_norm`` block. Pure Python
(no vLLM import), so the converter can use it anywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
HEAL_PLOT_FILE = "heal.png"  # held-out PPL and KL against heal tokens (converter/heal/plot.py)
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
# Normed attention (sources with per-head q/k RMSNorm before RoPE, e.g. Qwen3; method.md
# section 5): the source's own query and key projections and norms run uncached, then linear maps
# take the normalised heads into the converted coordinates. Per token:
#   q_h = q_head_map_h(q_norm(q_head_proj(x)_h))            (one (dn + r) x d map per head)
#   [latent; rope key] = kv_a_proj_with_mqa(x) + kv_a_key_map(k_norm(k_head_proj(x)))
# so kv_a_proj_with_mqa holds the part linear in x (the values) and the cache is unchanged.
Q_HEAD_PROJ = "self_attn.q_head_proj.weight"
Q_NORM = "self_attn.q_norm.weight"
Q_HEAD_MAP = "self_attn.q_head_map.weight"
K_HEAD_PROJ = "self_attn.k_head_proj.weight"
K_NORM = "self_attn.k_norm.weight"
KV_A_KEY_MAP = "self_attn.kv_a_key_map.weight"
# Writing order within a layer: attention (biases only where the config has them), then the
# tensors the conversion copies from the source unchanged.
ATTN_TENSORS = (Q_PROJ, Q_BIAS, KV_A_PROJ, KV_A_BIAS, KV_B_PROJ, O_PROJ)
NORMED_ATTN_TENSORS = (
    Q_HEAD_PROJ,
    Q_NORM,
    Q_HEAD_MAP,
    K_HEAD_PROJ,
    K_NORM,
    KV_A_KEY_MAP,
    KV_A_PROJ,
    KV_A_BIAS,
    KV_B_PROJ,
    O_PROJ,
)
# What the converter and the plugin do with each attention tensor: the one definition the
# layer-wise reconstruction, heal, the fp8 cache scales and the plugin's padding read
# (tests/converter/conversion/test_tensor_roles.py checks they agree with it).
#   trained: the conversion computes it, so the reconstruction and heal train it; a q/k-normed
#     layer's kept source projections and norms are the source's own and are not trained.
#   layout: how its rows (columns) follow the latent dims, which decides both its zero padding
#     to a served shape (transmla_vllm/padding.py) and how a power-of-two fp8 cache scale 2^e
#     per latent component / rope pair folds into it (converter/math/fp8_scales.py):
#     KV_A_ROWS, rows [latent; rope pairs] (scale: multiplied by 2^e); KV_B_COLUMNS, per head
#     [nope; v] rows over latent columns (columns divided by 2^e); QUERY_ROWS, per head
#     [nope; rope] rows (rope rows divided by the pair's 2^e); O_COLUMNS, per head v input
#     columns (no scale). None: the source's own layout, neither padded nor scaled.
#   source: the layer-relative source tensor an untrained one is a copy of (heal shares it
#     with the teacher, see CheckpointLayout.kept_from_source).
KV_A_ROWS = "kv_a rows"
KV_B_COLUMNS = "kv_b columns"
QUERY_ROWS = "query rows"
O_COLUMNS = "o columns"
FP8_FOLDED_LAYOUTS = (KV_A_ROWS, KV_B_COLUMNS, QUERY_ROWS)
# the source's query and key projections, which a q/k-normed layer keeps under other names (the
# query's has the name of the converted projection that replaces it in a plain layer)
SOURCE_Q_PROJ = Q_PROJ
SOURCE_K_PROJ = "self_attn.k_proj.weight"


@dataclass(frozen=True)
class AttentionRole:
    trained: bool
    layout: str | None = None
    source: str | None = None


ATTENTION_ROLES: dict[str, AttentionRole] = {
    Q_PROJ: AttentionRole(trained=True, layout=QUERY_ROWS),
    Q_BIAS: AttentionRole(trained=True, layout=QUERY_ROWS),
    KV_A_PROJ: AttentionRole(trained=True, layout=KV_A_ROWS),
    KV_A_BIAS: AttentionRole(trained=True, layout=KV_A_ROWS),
    KV_B_PROJ: AttentionRole(trained=True, layout=KV_B_COLUMNS),
    O_PROJ: AttentionRole(trained=True, layout=O_COLUMNS),
    Q_HEAD_PROJ: AttentionRole(trained=False, source=SOURCE_Q_PROJ),
    Q_NORM: AttentionRole(trained=False, source=Q_NORM),
    # the normed attention's maps have the output rows of q_proj / kv_a_proj_with_mqa over
    # other input widths
    Q_HEAD_MAP: AttentionRole(trained=True, layout=QUERY_ROWS),
    K_HEAD_PROJ: AttentionRole(trained=False, source=SOURCE_K_PROJ),
    K_NORM: AttentionRole(trained=False, source=K_NORM),
    KV_A_KEY_MAP: AttentionRole(trained=True, layout=KV_A_ROWS),
}
# derived from the table, for readers that need one list
CONVERTED_ATTENTION = tuple(name for name, role in ATTENTION_ROLES.items() if role.trained)
FP8_FOLDS = {
    name: role.layout for name, role in ATTENTION_ROLES.items() if role.layout in FP8_FOLDED_LAYOUTS
}
KEPT_ATTENTION = {name: role.source for name, role in ATTENTION_ROLES.items() if role.source}
DENSE_TENSORS = (INPUT_NORM, POST_ATTN_NORM, GATE_PROJ, UP_PROJ, DOWN_PROJ)
# Mixture-of-experts MLP (Qwen3-MoE), copied from the source under its own names: the router,
# then each expert's gate / up / down projections.
ROUTER = "mlp.gate.weight"
EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")


def expert_tensor(expert: int, part: str) -> str:
    """Layer-relative name of one expert's projection (``part`` in EXPERT_PARTS)."""
    return f"mlp.experts.{expert}.{part}.weight"


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


# Key of the ``transmla`` block that switches the normed attention on (absent: plain path).
QK_NORM_KEY = "qk_norm"


@dataclass(frozen=True)
class QKNorm:
    """The normed attention's source geometry: per-head RMSNorm over ``head_dim`` on the
    query (``num_heads`` heads) and the keys (``num_kv_heads`` heads), epsilon ``eps``."""

    num_kv_heads: int
    head_dim: int
    eps: float

    @property
    def key_width(self) -> int:
        return self.num_kv_heads * self.head_dim


def qk_norm(cfg: Any) -> QKNorm | None:
    """The normed-attention block of a converted config (None: the plain LLaMA-style path)."""
    block = transmla_block(cfg).get(QK_NORM_KEY)
    if not block:
        return None
    return QKNorm(int(block["num_kv_heads"]), int(block["head_dim"]), float(block["eps"]))


# Key of the ``transmla`` block that says how the MLP is built when it is not the dense SiLU
# MLP. The DeepSeek fields stay dense (n_routed_experts 0) on purpose: a stock DeepSeek class
# must not load these experts with DeepSeek's routing.
MLP_KEY = "mlp"
QWEN3_MOE = "qwen3_moe"


@dataclass(frozen=True)
class MoEMLP:
    """A Qwen3-MoE MLP: softmax over ``num_experts`` router logits, top ``num_experts_per_tok``,
    weights renormalised to sum 1 when ``norm_topk_prob``, no shared expert. ``sparse_layers``
    are the layers that have it; the others keep the dense MLP of ``intermediate_size``."""

    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    moe_intermediate_size: int
    sparse_layers: tuple[int, ...]
    type: str = QWEN3_MOE


def moe_mlp(cfg: Any) -> MoEMLP | None:
    """The MoE block of a converted config (None: every layer has the dense MLP)."""
    block = transmla_block(cfg).get(MLP_KEY)
    if not block:
        return None
    if block.get("type") != QWEN3_MOE:
        raise ValueError(f"transmla.{MLP_KEY}.type {block.get('type')!r} is not {QWEN3_MOE!r}")
    return MoEMLP(
        num_experts=int(block["num_experts"]),
        num_experts_per_tok=int(block["num_experts_per_tok"]),
        norm_topk_prob=bool(block["norm_topk_prob"]),
        moe_intermediate_size=int(block["moe_intermediate_size"]),
        sparse_layers=tuple(int(i) for i in block["sparse_layers"]),
    )


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
    qk_norm: QKNorm | None = None
    moe: MoEMLP | None = None

    def is_sparse(self, layer: int) -> bool:
        """Whether ``layer`` has the mixture-of-experts MLP."""
        return self.moe is not None and layer in self.moe.sparse_layers

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
        names = ATTN_TENSORS
        if self.qk_norm is not None:
            n = self.qk_norm
            every |= {
                Q_HEAD_PROJ: (heads * n.head_dim, d),
                Q_NORM: (n.head_dim,),
                Q_HEAD_MAP: (q_rows, n.head_dim),
                K_HEAD_PROJ: (n.key_width, d),
                K_NORM: (n.head_dim,),
                KV_A_KEY_MAP: (kv_a_rows, n.key_width),
            }
            names = NORMED_ATTN_TENSORS
        return {n: every[n] for n in names if n not in absent}

    def dense_shapes(self, layer: int = 0) -> dict[str, tuple[int, ...]]:
        """Layer-relative tensors copied from the source: norms and MLP (dense or experts)."""
        d, inter = self.shape.hidden_size, self.intermediate_size
        if not self.is_sparse(layer):
            shapes = ((d,), (d,), (inter, d), (inter, d), (d, inter))
            return dict(zip(DENSE_TENSORS, shapes, strict=True))
        moe = self.moe
        assert moe is not None
        e_inter = moe.moe_intermediate_size
        shapes = ((e_inter, d), (e_inter, d), (d, e_inter))
        part_shapes = dict(zip(EXPERT_PARTS, shapes, strict=True))
        out = {INPUT_NORM: (d,), POST_ATTN_NORM: (d,), ROUTER: (moe.num_experts, d)}
        for e in range(moe.num_experts):
            out.update({expert_tensor(e, p): s for p, s in part_shapes.items()})
        return out

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the checkpoint by full name, in writing order."""
        d = self.shape.hidden_size
        out = {EMBED: (self.vocab_size, d)}
        attention = self.attention_shapes()
        for i in range(self.num_layers):
            per_layer = {**attention, **self.dense_shapes(i)}
            out.update({layer_prefix(i) + n: s for n, s in per_layer.items()})
        out[FINAL_NORM] = (d,)
        if not self.tie_word_embeddings:
            out[LM_HEAD] = (self.vocab_size, d)
        return out

    def kept_from_source(self) -> dict[str, str]:
        """The tensors a conversion copies from the source unchanged, full converted name ->
        full source name: embeddings, final norm and head, each layer's norms and MLP (dense or
        experts, named alike in both), and a q/k-normed layer's projections and norms
        (KEPT_ATTENTION). Heal's student holds them bit for bit as the teacher does."""
        out = {EMBED: EMBED}
        kept = {n: KEPT_ATTENTION[n] for n in self.attention_shapes() if n in KEPT_ATTENTION}
        for i in range(self.num_layers):
            p = layer_prefix(i)
            out.update({p + n: p + n for n in self.dense_shapes(i)})
            out.update({p + n: p + source for n, source in kept.items()})
        out[FINAL_NORM] = FINAL_NORM
        if not self.tie_word_embeddings:
            out[LM_HEAD] = LM_HEAD
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
            qk_norm=qk_norm(cfg),
            moe=moe_mlp(cfg),
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
            **({QK_NORM_KEY: asdict(layout.qk_norm)} if layout.qk_norm else {}),
            **({MLP_KEY: asdict(layout.moe)} if layout.moe else {}),
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
