"""Assemble DeepSeek-named MLA weights of one layer from GQA weights (method.md section 4).

Repetition of KV heads moves into the up-projections (head h reads KV head h // (H/G)); the
query absorbs the rope part of the key rotation; the softmax scale changes from d^-1/2 to
(d + r)^-1/2, so queries are multiplied by sqrt((d + r)/d) to keep every logit unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from converter.math.kv_pca import LatentBasis
from converter.math.rorope import KeyRotation
from transmla_vllm.checkpoint_format import KV_A_BIAS, KV_A_PROJ, KV_B_PROJ, O_PROJ, Q_BIAS, Q_PROJ


@dataclass(frozen=True)
class GQAAttention:
    """One source attention layer (any float dtype; the math upcasts to fp64 piece by piece);
    biases are None when absent."""

    q_weight: torch.Tensor  # (H*d, D)
    k_weight: torch.Tensor  # (G*d, D)
    v_weight: torch.Tensor  # (G*d, D)
    o_weight: torch.Tensor  # (D, H*d)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    # per-head RMSNorm weights (d,) applied before RoPE (Qwen3); None: no q/k norm
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


def _bias_or_zero(bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    return torch.zeros(rows, dtype=torch.float64) if bias is None else bias.to(torch.float64)


def kv_b_proj(src: GQAAttention, rotation: KeyRotation, latent: LatentBasis) -> torch.Tensor:
    """kv_b_proj in fp64: head h reads KV head g = h // (H/G), [s * Q_nope[:, g]^T R_K ; R_V[g]]
    (the same for the plain and the normed attention: both cache the same latent)."""
    heads, d = src.num_heads, src.head_dim
    per_group = heads // src.num_kv_heads
    f64 = torch.float64
    nope_map = rotation.nope.to(f64)
    r_key, r_val = latent.key_part.to(f64), latent.value_part.to(f64)
    kv_b = torch.empty(heads * 2 * d, r_key.shape[1], dtype=f64)
    for h in range(heads):
        block = slice((h // per_group) * d, (h // per_group + 1) * d)
        kv_b[2 * h * d : (2 * h + 1) * d] = latent.key_scale * nope_map[:, block].T @ r_key
        kv_b[(2 * h + 1) * d : (2 * h + 2) * d] = r_val[block]
    return kv_b


def softmax_scale_gain(head_dim: int, rope_dim: int) -> float:
    """sqrt((d + r)/d): the query gain that keeps logits when the softmax scale becomes
    (d + r)^-1/2 (the converted nope part is d wide, the rope part r)."""
    return ((head_dim + rope_dim) / head_dim) ** 0.5


def assemble_mla(
    src: GQAAttention,
    rotation: KeyRotation,
    latent: LatentBasis,
    out_dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Return q_proj / kv_a_proj_with_mqa / kv_b_proj / o_proj tensors for one layer.

    Every product is taken in fp64; results are stored in ``out_dtype`` head by head, so the
    large q_proj never exists in fp64 (for a Llama-3-8B layer that saves 0.4 GB at the peak).
    o_proj is passed through unchanged (no copy when it already has ``out_dtype``)."""
    heads, groups, d = src.num_heads, src.num_kv_heads, src.head_dim
    per_group = heads // groups
    r = rotation.rope_dim
    width = groups * d
    f64 = torch.float64
    wk, wv = src.k_weight.to(f64), src.v_weight.to(f64)
    bk, bv = _bias_or_zero(src.k_bias, width), _bias_or_zero(src.v_bias, width)
    rope_map, nope_map = rotation.rope.to(f64), rotation.nope.to(f64)
    s = latent.key_scale
    r_key, r_val = latent.key_part.to(f64), latent.value_part.to(f64)

    # latent c = R_K^T (Q_nope k) / s + R_V^T v ; rope key = Q_rope k
    latent_w = (r_key.T @ nope_map @ wk) / s + r_val.T @ wv
    latent_b = (r_key.T @ nope_map @ bk) / s + r_val.T @ bv
    kv_a_w = torch.cat([latent_w, rope_map @ wk])
    kv_a_b = torch.cat([latent_b, rope_map @ bk])

    alpha = softmax_scale_gain(d, r)
    rows = d + r  # q rows per head: nope part, then rope part
    q_w = torch.empty(heads * rows, src.q_weight.shape[1], dtype=out_dtype)
    q_b = torch.empty(heads * rows, dtype=f64)
    for h in range(heads):
        block = slice((h // per_group) * d, (h // per_group + 1) * d)
        wq_h = src.q_weight[h * d : (h + 1) * d].to(f64)
        bq_h = (
            torch.zeros(d, dtype=f64)
            if src.q_bias is None
            else src.q_bias[h * d : (h + 1) * d].to(f64)
        )
        q_w[h * rows : h * rows + d] = alpha * wq_h
        q_w[h * rows + d : (h + 1) * rows] = alpha * rope_map[:, block] @ wq_h
        q_b[h * rows : h * rows + d] = alpha * bq_h
        q_b[h * rows + d : (h + 1) * rows] = alpha * rope_map[:, block] @ bq_h

    out = {
        Q_PROJ: q_w,
        KV_A_PROJ: kv_a_w.to(out_dtype),
        KV_B_PROJ: kv_b_proj(src, rotation, latent).to(out_dtype),
        O_PROJ: src.o_weight.to(out_dtype),
    }
    if src.q_bias is not None:
        out[Q_BIAS] = q_b.to(out_dtype)
    if src.k_bias is not None or src.v_bias is not None:
        out[KV_A_BIAS] = kv_a_b.to(out_dtype)
    return out
