"""Power-of-two scales that keep an fp8 latent cache inside e4m3's range (docs/fp8_cache.md).

vLLM stores the latent and the roped rope key in e4m3 with a scale of 1.0, and FLASHMLA /
FLASHINFER_MLA quantize the absorbed query [q_nope W_UK ; q_pe] the same way. e4m3 keeps the
same relative precision from 2^-6 to 448: what hurts is saturation above 448 (and, far less,
values below 2^-6). Latent component j can be multiplied by any c_j if column j of kv_b_proj is
divided by it (the absorbed query's component j then shrinks by c_j); a rope pair, with the
inverse in the query's rope rows. Powers of two make this exact in every float format, so bf16 /
fp32 outputs stay bit for bit what they were. Each component keeps scale 1 when its calibration
maxima already sit in [FLOOR, E4M3_MAX / HEADROOM] on both sides; otherwise it gets the power of
two nearest 1 that puts them there, or, when no scale can, the one that balances them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from transmla_vllm.checkpoint_format import (
    KV_A_BIAS,
    KV_A_KEY_MAP,
    KV_A_PROJ,
    KV_B_PROJ,
    Q_BIAS,
    Q_HEAD_MAP,
    Q_PROJ,
)

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
# calibration maxima stay this far under the largest finite value: unseen text runs higher
HEADROOM = 4.0
# a component whose largest value is at least 1 keeps most values above e4m3's smallest
# normal number (2^-6); below that the cache would hold mostly subnormals
FLOOR = 1.0
MAX_EXPONENT = 24  # |log2 c| bound: keeps scaled weights far from fp32 / bf16 limits


@dataclass(frozen=True)
class CacheMaxima:
    """Largest magnitudes seen on calibration text, per cached component."""

    latent: torch.Tensor  # [rank] max |latent_j|
    query: torch.Tensor  # [rank] max over heads of |(q_nope W_UK)_j|
    rope_key: torch.Tensor  # [rope / 2] max norm of each rope pair (RoPE keeps pair norms)
    rope_query: torch.Tensor  # [rope / 2] max over heads of each query rope pair's norm


@dataclass(frozen=True)
class Fp8Scales:
    """log2 of the scale per latent component and per rope pair (0 = unchanged)."""

    latent: list[int]
    rope: list[int]

    @property
    def identity(self) -> bool:
        return not any(self.latent) and not any(self.rope)


def _exponent(value: float, query: float) -> int:
    """log2 of the power of two c nearest 1 with value*c and query/c in [FLOOR, top]."""
    if value <= 0 or query <= 0 or not (math.isfinite(value) and math.isfinite(query)):
        return 0  # a dead or broken component: nothing to place
    top = E4M3_MAX / HEADROOM
    low = math.ceil(math.log2(max(FLOOR / value, query / top)))
    high = math.floor(math.log2(min(top / value, query / FLOOR)))
    if low <= high:
        exponent = min(max(0, low), high)
    else:  # no scale fits both: give each side the same share of the range
        exponent = round(0.5 * math.log2(query / value))
    return max(-MAX_EXPONENT, min(MAX_EXPONENT, exponent))


def choose_fp8_scales(maxima: CacheMaxima) -> Fp8Scales:
    def exps(values: torch.Tensor, queries: torch.Tensor) -> list[int]:
        return [_exponent(float(v), float(q)) for v, q in zip(values, queries, strict=True)]

    return Fp8Scales(exps(maxima.latent, maxima.query), exps(maxima.rope_key, maxima.rope_query))


def apply_fp8_scales(
    tensors: dict[str, torch.Tensor],
    scales: Fp8Scales,
    num_heads: int,
    nope_dim: int,
    inverse: bool = False,
) -> dict[str, torch.Tensor]:
    """A copy of one layer's attention ``tensors`` with ``scales`` folded in (``inverse``:
    taken out again). Rows of the kv_a maps (latent, then rope pairs) are multiplied, kv_b's
    columns and the query's rope rows divided; tensors not involved are passed through."""
    sign = -1.0 if inverse else 1.0
    latent = torch.tensor([2.0 ** (sign * e) for e in scales.latent], dtype=torch.float64)
    pairs = torch.tensor([2.0 ** (sign * e) for e in scales.rope], dtype=torch.float64)
    rope = pairs.repeat_interleave(2)  # interleaved (GPT-J) layout: pair p is rows 2p, 2p + 1
    rows = torch.cat([latent, rope])

    def scaled(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        return (t.to(torch.float64) * factor).to(t.dtype)  # power of two: exact

    out = dict(tensors)
    for name in (KV_A_PROJ, KV_A_KEY_MAP):
        if name in out:
            out[name] = scaled(out[name], rows[:, None])
    if KV_A_BIAS in out:
        out[KV_A_BIAS] = scaled(out[KV_A_BIAS], rows)
    out[KV_B_PROJ] = scaled(out[KV_B_PROJ], 1.0 / latent[None, :])
    per_head = torch.cat([torch.ones(nope_dim, dtype=torch.float64), 1.0 / rope])
    query_rows = per_head.repeat(num_heads)
    for name in (Q_PROJ, Q_HEAD_MAP):
        if name in out:
            out[name] = scaled(out[name], query_rows[:, None])
    if Q_BIAS in out:
        out[Q_BIAS] = scaled(out[Q_BIAS], query_rows)
    return out
