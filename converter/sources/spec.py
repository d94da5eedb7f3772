"""The source spec: what the converter needs to know about a GQA source, read once from its
config.json so no later stage re-reads the raw dict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transmla_vllm.checkpoint_format import MoEMLP


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


def rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """Normalise rope settings (legacy rope_theta + rope_scaling, or transformers-5
    rope_parameters) into one dict with rope_type and rope_theta, so refusals and the spec
    read one shape whichever transformers wrote the config."""
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
