"""Source tensor names and shapes, derived from a spec: what the reader checks a source folder
holds before converting, and what per-layer loading asks for."""

from __future__ import annotations

from converter.sources.spec import SourceSpec
from transmla_vllm.checkpoint_format import (
    DOWN_PROJ,
    EMBED,
    EXPERT_PARTS,
    FINAL_NORM,
    GATE_PROJ,
    LM_HEAD,
    ROUTER,
    UP_PROJ,
    expert_tensor,
    layer_prefix,
)

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
