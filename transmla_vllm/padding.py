"""Exact zero padding of attention tensors from a checkpoint's shape to the served one.

vLLM's MLA kernels take only a few shapes (see ``backends.py``); zero padding serves any
smaller one with the same outputs:

* latent: extra zero rows at the end of the latent block of ``kv_a_proj_with_mqa`` (weight and
  bias) and extra zero columns of ``kv_b_proj``: the extra latent channels are always 0 and
  nothing reads them;
* rope r -> r' = k*r (k integer): rope pair m moves to pair slot k*m, the other slots are 0.
  An r'-dim rope gives slot k*m the frequency theta^(-2km/r') = theta^(-2m/r), the one pair m
  had; the default, linear and llama3 laws depend on that frequency only, so scores stay;
* nope / v: zero q/k nope rows, zero v rows of ``kv_b_proj`` and zero input columns of
  ``o_proj``.

The softmax scale stays (source nope + source rope)^-0.5 (the model class sets it). Every
function takes the full (unsharded) tensor, ``src`` / ``dst`` dims and the number of attention
heads, so the loader can dispatch on tensor name through one table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from transmla_vllm.checkpoint_format import (
    ATTENTION_ROLES,
    KV_A_ROWS,
    KV_B_COLUMNS,
    O_COLUMNS,
    QUERY_ROWS,
    LatentDims,
)

# (tensor, checkpoint dims, served dims, num_heads) -> served tensor
PadFn = Callable[[torch.Tensor, LatentDims, LatentDims, int], torch.Tensor]


def rope_stride(src: LatentDims, dst: LatentDims) -> int:
    """Pair slot stride k: source rope pair m sits in served slot k*m."""
    return dst.qk_rope_head_dim // src.qk_rope_head_dim


def _pad_rope_rows(rope: torch.Tensor, stride: int) -> torch.Tensor:
    """Move interleaved rope pair m (rows 2m, 2m+1) to pair slot stride*m."""
    if stride == 1:
        return rope
    pairs = rope.reshape(rope.shape[0] // 2, 2, *rope.shape[1:])
    out = pairs.new_zeros(pairs.shape[0] * stride, *pairs.shape[1:])
    out[::stride] = pairs
    return out.reshape(-1, *rope.shape[1:])


def _place(block: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-extend the leading dim of ``block`` to ``rows``."""
    if block.shape[0] == rows:
        return block
    out = block.new_zeros(rows, *block.shape[1:])
    out[: block.shape[0]] = block
    return out


def pad_q_proj(t: torch.Tensor, src: LatentDims, dst: LatentDims, num_heads: int) -> torch.Tensor:
    """q_proj weight [H*(dn+r), D] or bias [H*(dn+r)] -> served per-head layout."""
    per_head = t.reshape(num_heads, src.qk_nope_head_dim + src.qk_rope_head_dim, -1)
    stride = rope_stride(src, dst)
    out = []
    for head in per_head:
        nope, rope = head.split([src.qk_nope_head_dim, src.qk_rope_head_dim])
        out.append(torch.cat([_place(nope, dst.qk_nope_head_dim), _pad_rope_rows(rope, stride)]))
    return torch.stack(out).reshape(-1, *t.shape[1:])


def pad_kv_a_proj(
    t: torch.Tensor, src: LatentDims, dst: LatentDims, num_heads: int
) -> torch.Tensor:
    """kv_a_proj_with_mqa weight [rho+r, D] or bias: zero latent rows, rope last.

    ``num_heads`` is unused (one latent serves every head); it keeps the signature uniform.
    """
    latent, rope = t.split([src.kv_lora_rank, src.qk_rope_head_dim])
    return torch.cat(
        [_place(latent, dst.kv_lora_rank), _pad_rope_rows(rope, rope_stride(src, dst))]
    )


def pad_kv_b_proj(
    t: torch.Tensor, src: LatentDims, dst: LatentDims, num_heads: int
) -> torch.Tensor:
    """kv_b_proj weight [H*(dn+dv), rho] -> [H*(dn'+dv'), rho'] with zeros."""
    per_head = t.reshape(num_heads, src.qk_nope_head_dim + src.v_head_dim, -1)
    out = t.new_zeros(num_heads, dst.qk_nope_head_dim + dst.v_head_dim, dst.kv_lora_rank)
    dn, dv, rho = src.qk_nope_head_dim, src.v_head_dim, src.kv_lora_rank
    out[:, :dn, :rho] = per_head[:, :dn]
    out[:, dst.qk_nope_head_dim : dst.qk_nope_head_dim + dv, :rho] = per_head[:, dn:]
    return out.reshape(-1, dst.kv_lora_rank)


def pad_o_proj(t: torch.Tensor, src: LatentDims, dst: LatentDims, num_heads: int) -> torch.Tensor:
    """o_proj weight [D, H*dv] -> [D, H*dv'] with zero input columns."""
    if src.v_head_dim == dst.v_head_dim:
        return t
    out = t.new_zeros(t.shape[0], num_heads, dst.v_head_dim)
    out[:, :, : src.v_head_dim] = t.reshape(t.shape[0], num_heads, src.v_head_dim)
    return out.reshape(t.shape[0], -1)


PAD_BY_LAYOUT: dict[str, PadFn] = {
    QUERY_ROWS: pad_q_proj,
    KV_A_ROWS: pad_kv_a_proj,
    KV_B_COLUMNS: pad_kv_b_proj,
    O_COLUMNS: pad_o_proj,
}
# Layer-relative checkpoint tensor -> its padding, by the layout checkpoint_format gives it;
# every other tensor loads unchanged.
PADDING: dict[str, PadFn] = {
    name: PAD_BY_LAYOUT[role.layout]
    for name, role in ATTENTION_ROLES.items()
    if role.layout is not None
}
