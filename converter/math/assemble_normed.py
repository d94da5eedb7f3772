"""Assemble the normed MLA attention of one layer (sources with per-head q/k RMSNorm before
RoPE, e.g. Qwen3; method.md section 5).

RMSNorm does not commute with the key rotation, but everything after the norm is linear: the
rotation, FreqFold and the latent basis act on the normalised keys n = concat_g k_norm(W_k,g x).
So the source's k projection and k norm stay (uncached), one map takes n to [latent; rope key],
and the values' share of the latent stays a plain projection of x (``kv_a_proj_with_mqa``).
The query keeps its projection and norm; a per-head (d + r) x d map applies the rope part of the
rotation and the softmax-scale gain. kv_b_proj and o_proj are those of the plain path.
"""

from __future__ import annotations

import torch

from converter.math.assemble import GQAAttention, kv_b_proj, softmax_scale_gain
from converter.math.kv_pca import LatentBasis
from converter.math.rorope import KeyRotation
from transmla_vllm.checkpoint_format import (
    K_HEAD_PROJ,
    K_NORM,
    KV_A_BIAS,
    KV_A_KEY_MAP,
    KV_A_PROJ,
    KV_B_PROJ,
    O_PROJ,
    Q_HEAD_MAP,
    Q_HEAD_PROJ,
    Q_NORM,
)


def assemble_normed_mla(
    src: GQAAttention,
    rotation: KeyRotation,
    latent: LatentBasis,
    out_dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """The normed attention tensors of one layer; products in fp64, stored in ``out_dtype``.

    [latent; rope key] = kv_a_proj_with_mqa x + kv_a_key_map n, with
    kv_a_key_map = [R_K^T Q_nope / s ; Q_rope] (on n) and kv_a_proj_with_mqa = [R_V^T W_v ; 0]
    (on x; the v bias rides along). Head h of the query, reading KV head g = h // (H/G):
    q_h = alpha [I_d ; Q_rope[:, g]] q_norm(W_q,h x), alpha = sqrt((d + r)/d).
    """
    if src.q_norm is None or src.k_norm is None:
        raise ValueError("the normed assembly needs the source's q_norm and k_norm weights")
    if src.q_bias is not None or src.k_bias is not None:
        raise ValueError("the normed assembly takes no q/k bias (none of its sources has one)")
    heads, groups, d = src.num_heads, src.num_kv_heads, src.head_dim
    per_group = heads // groups
    r = rotation.rope_dim
    f64 = torch.float64
    rope_map, nope_map = rotation.rope.to(f64), rotation.nope.to(f64)
    r_key, r_val = latent.key_part.to(f64), latent.value_part.to(f64)
    rank = r_key.shape[1]

    key_map = torch.cat([(r_key.T @ nope_map) / latent.key_scale, rope_map])
    values = torch.zeros(rank + r, src.v_weight.shape[1], dtype=f64)
    values[:rank] = r_val.T @ src.v_weight.to(f64)

    alpha = softmax_scale_gain(d, r)
    head_map = torch.zeros(heads, d + r, d, dtype=f64)
    for h in range(heads):
        block = slice((h // per_group) * d, (h // per_group + 1) * d)
        head_map[h, :d] = alpha * torch.eye(d, dtype=f64)
        head_map[h, d:] = alpha * rope_map[:, block]

    out = {
        Q_HEAD_PROJ: src.q_weight.to(out_dtype),
        Q_NORM: src.q_norm.to(out_dtype),
        Q_HEAD_MAP: head_map.reshape(heads * (d + r), d).to(out_dtype),
        K_HEAD_PROJ: src.k_weight.to(out_dtype),
        K_NORM: src.k_norm.to(out_dtype),
        KV_A_KEY_MAP: key_map.to(out_dtype),
        KV_A_PROJ: values.to(out_dtype),
        KV_B_PROJ: kv_b_proj(src, rotation, latent).to(out_dtype),
        O_PROJ: src.o_weight.to(out_dtype),
    }
    if src.v_bias is not None:
        bias = torch.zeros(rank + r, dtype=f64)
        bias[:rank] = r_val.T @ src.v_bias.to(f64)
        out[KV_A_BIAS] = bias.to(out_dtype)
    return out
