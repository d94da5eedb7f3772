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


@dataclass(frozen=True)
class GQAAttention:
    """One source attention layer in fp64; biases are None when absent."""

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


def _bias_or_zero(bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    return torch.zeros(rows, dtype=torch.float64) if bias is None else bias.to(torch.float64)


def assemble_mla(src: GQAAttention, rotation: KeyRotation, latent: LatentBasis
                 ) -> dict[str, torch.Tensor]:
    """Return q_proj / kv_a_proj_with_mqa / kv_b_proj / o_proj tensors (fp64) for one layer."""
    heads, groups, d = src.num_heads, src.num_kv_heads, src.head_dim
    per_group = heads // groups
    r = rotation.rope_dim
    width = groups * d
    f64 = torch.float64
    wq, wk, wv = (w.to(f64) for w in (src.q_weight, src.k_weight, src.v_weight))
    bq = _bias_or_zero(src.q_bias, heads * d)
    bk, bv = _bias_or_zero(src.k_bias, width), _bias_or_zero(src.v_bias, width)
    rope_map, nope_map = rotation.rope.to(f64), rotation.nope.to(f64)
    s = latent.key_scale
    r_key, r_val = latent.key_part.to(f64), latent.value_part.to(f64)

    # latent c = R_K^T (Q_nope k) / s + R_V^T v ; rope key = Q_rope k
    latent_w = (r_key.T @ nope_map @ wk) / s + r_val.T @ wv
    latent_b = (r_key.T @ nope_map @ bk) / s + r_val.T @ bv
    kv_a_w = torch.cat([latent_w, rope_map @ wk])
    kv_a_b = torch.cat([latent_b, rope_map @ bk])

    alpha = ((d + r) / d) ** 0.5
    q_rows, q_bias_rows, kv_b_rows = [], [], []
    for h in range(heads):
        g = h // per_group
        block = slice(g * d, (g + 1) * d)
        wq_h, bq_h = wq[h * d:(h + 1) * d], bq[h * d:(h + 1) * d]
        q_rows += [alpha * wq_h, alpha * rope_map[:, block] @ wq_h]
        q_bias_rows += [alpha * bq_h, alpha * rope_map[:, block] @ bq_h]
        kv_b_rows += [s * nope_map[:, block].T @ r_key, r_val[block]]

    out = {
        "self_attn.q_proj.weight": torch.cat(q_rows),
        "self_attn.kv_a_proj_with_mqa.weight": kv_a_w,
        "self_attn.kv_b_proj.weight": torch.cat(kv_b_rows),
        "self_attn.o_proj.weight": src.o_weight.to(f64),
    }
    if src.q_bias is not None:
        out["self_attn.q_proj.bias"] = torch.cat(q_bias_rows)
    if src.k_bias is not None or src.v_bias is not None:
        out["self_attn.kv_a_proj_with_mqa.bias"] = kv_a_b
    return out
