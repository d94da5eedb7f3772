"""Power-of-two scales that keep an fp8 latent cache inside e4m3's range (docs/fp8_cache.md).

vLLM stores the latent and the roped rope key in e4m3 with a scale of 1.0, and FLASHMLA /
FLASHINFER_MLA quantize the absorbed query [q_nope W_UK ; q_pe] the same way. e4m3 keeps the
same relative precision from 2^-6 to 448: what hurts is saturation above 448 (and, far less,
values below 2^-6). Latent component j can be multiplied by any c_j if column j of kv_b_proj is
divided by it (the absorbed query's component j then shrinks by c_j); a rope pair, with the
inverse in the query's rope rows. Powers of two make this exact as long as every scaled value
stays a normal number of the output format (``fit_to_dtype`` clamps the exponents so it does:
for fp16 that binds, for bf16 / fp32 hardly ever), so the outputs stay bit for bit what they
were. Each component keeps scale 1 when its calibration maxima already sit in
[FLOOR, E4M3_MAX / HEADROOM] on both sides; otherwise it gets the power of two nearest 1 that
puts them there, or, when no scale can, the one that balances them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from transmla_vllm.checkpoint_format import (
    FP8_FOLDS,
    KV_A_ROWS,
    KV_B_COLUMNS,
    QUERY_ROWS,
)

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
# calibration maxima stay this far under the largest finite value: unseen text runs higher
HEADROOM = 4.0
# a component whose largest value is at least 1 keeps most values above e4m3's smallest
# normal number (2^-6); below that the cache would hold mostly subnormals
FLOOR = 1.0
MAX_EXPONENT = 24  # |log2 c| bound: keeps scaled weights far from fp32 / bf16 limits (not fp16's)


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
    taken out again), into the tensors ``FP8_FOLDS`` names (checkpoint_format.py): rows of the
    kv_a maps (latent, then rope pairs) are multiplied, kv_b's columns and the query's rope rows
    divided; tensors not involved are passed through."""
    sign = -1.0 if inverse else 1.0
    latent = torch.tensor([2.0 ** (sign * e) for e in scales.latent], dtype=torch.float64)
    pairs = torch.tensor([2.0 ** (sign * e) for e in scales.rope], dtype=torch.float64)
    rope = pairs.repeat_interleave(2)  # interleaved (GPT-J) layout: pair p is rows 2p, 2p + 1
    per_head = torch.cat([torch.ones(nope_dim, dtype=torch.float64), 1.0 / rope])
    factors = {  # per row (per column for kv_b)
        KV_A_ROWS: torch.cat([latent, rope]),
        KV_B_COLUMNS: 1.0 / latent,
        QUERY_ROWS: per_head.repeat(num_heads),
    }

    def scaled(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        return (t.to(torch.float64) * factor).to(t.dtype)  # power of two: exact

    out = dict(tensors)
    for name, t in tensors.items():
        fold = FP8_FOLDS.get(name)
        if fold is None:
            continue
        factor = factors[fold]
        if fold == KV_B_COLUMNS:
            factor = factor[None, :]
        elif t.dim() == 2:
            factor = factor[:, None]
        out[name] = scaled(t, factor)
    return out


@dataclass(frozen=True)
class _Side:
    """One side of a component's fold (the entries it multiplies, or those it divides), as the
    values would round to the output dtype: the largest rounded magnitude, the smallest nonzero
    magnitude before rounding, and whether some nonzero entry is not exactly representable and
    sits below the smallest normal number (there the rounding grid does not scale with 2^k)."""

    max_rounded: torch.Tensor  # [components] float64
    min_nonzero: torch.Tensor  # [components] float64, inf where all zero
    inexact_small: torch.Tensor  # [components] bool


def _fold_layout(
    tensors: dict[str, torch.Tensor], rank: int, pairs: int, num_heads: int, nope_dim: int
):
    """(tensor name, dim, component index per position along dim (-1: untouched), kv_a side)
    for every tensor ``apply_fp8_scales`` changes: the same rows and columns it scales."""
    latent = torch.arange(rank)
    rope = rank + torch.arange(pairs).repeat_interleave(2)
    kv_a = torch.cat([latent, rope])
    per_head = torch.cat([torch.full((nope_dim,), -1), rope])
    where = {
        KV_A_ROWS: (0, kv_a, True),
        KV_B_COLUMNS: (1, latent, False),
        QUERY_ROWS: (0, per_head.repeat(num_heads), False),
    }
    return [(name, *where[fold]) for name, fold in FP8_FOLDS.items() if name in tensors]


@torch.no_grad()
def _sides(
    tensors: dict[str, torch.Tensor],
    scales: Fp8Scales,
    num_heads: int,
    nope_dim: int,
    dtype: torch.dtype,
) -> tuple[_Side, _Side]:
    """Per component: the kv_a side (kv_a rows, bias) and the other side (kv_b columns, the
    query's rope rows and bias)."""
    rank, pairs = len(scales.latent), len(scales.rope)
    count = rank + pairs
    tiny = float(torch.finfo(dtype).tiny)
    f64 = torch.float64
    stats = {
        side: (
            torch.zeros(count, dtype=f64),
            torch.full((count,), math.inf, dtype=f64),
            torch.zeros(count, dtype=f64),
        )
        for side in (True, False)
    }
    for name, dim, comp, kv_a_side in _fold_layout(tensors, rank, pairs, num_heads, nope_dim):
        t = tensors[name]
        t = t.unsqueeze(1) if t.dim() == 1 else (t.T if dim == 1 else t)  # positions x entries
        rows = (comp >= 0).nonzero().squeeze(1)
        max_r, min_x, bad = stats[kv_a_side]
        step = max(1, (1 << 22) // max(1, t.shape[1]))  # bound the fp64 copies
        for start in range(0, rows.numel(), step):
            idx = rows[start : start + step]
            x = t.index_select(0, idx).to(f64)
            r = t.index_select(0, idx).to(dtype).to(f64)
            ax = x.abs()
            owner = comp[idx]
            max_r.scatter_reduce_(0, owner, r.abs().amax(1), "amax")
            nonzero = torch.where(x != 0, ax, torch.full_like(ax, math.inf))
            min_x.scatter_reduce_(0, owner, nonzero.amin(1), "amin")
            small = ((x != 0) & (ax < tiny) & (x != r)).any(1).to(f64)
            bad.scatter_reduce_(0, owner, small, "amax")
    kv_a, other = (_Side(m, n, b > 0) for m, n, b in (stats[True], stats[False]))
    return kv_a, other


def fit_to_dtype(
    scales: Fp8Scales,
    tensors: dict[str, torch.Tensor],
    num_heads: int,
    nope_dim: int,
    dtype: torch.dtype,
) -> Fp8Scales:
    """``scales`` with each exponent moved toward 0 just as far as needed for folding them into
    ``tensors`` (one layer's attention tensors, as ``apply_fp8_scales`` takes them) to stay
    exact once the result is cast to ``dtype``: for every entry w, cast(fold(w)) equals
    fold(cast(w)) taken in float64, so the ``dtype`` checkpoint is the unscaled ``dtype``
    checkpoint with its weights moved by powers of two, and computes the same outputs.

    Why: a power of two only moves the exponent, which is exact while a value stays a normal
    number. ``MAX_EXPONENT`` (2^24) keeps fp32 / bf16 weights far inside their range, but fp16
    holds only 2^-14 (smallest normal) to 65504: scaled up, a weight can overflow; scaled down,
    it becomes subnormal and loses mantissa bits, or rounds to zero. So a component keeps
    exponent e (|e| = k, the side multiplied by 2^k called up, the other side down) only if
      - every up entry, as it rounds to ``dtype``, times 2^k is at most finfo.max (so neither the
        value nor its rounding overflows), and no nonzero up entry is below finfo.tiny unless it
        is exactly representable (a subnormal value's rounding grid does not scale: 2^k x the
        rounded value differs from the rounded 2^k x value);
      - every nonzero down entry divided by 2^k is at least finfo.tiny, and no down entry rounds
        to infinity.
    These are sufficient, not necessary (an exponent that is exact by luck in the subnormal
    range may still be clamped). Fp32 weights that are already subnormal in ``dtype`` block any
    exponent of their component in either direction: that is what the definition demands, and
    for fp16 it binds on most components of wide layers (weights under 2^-14 are common). The
    exponents are never moved away from 0 or past it. Since fp16's and bf16's normal ranges lie
    within fp32's, the fp32 fold the conversion stores first is then exact too.
    """
    if scales.identity:
        return scales
    finfo = torch.finfo(dtype)
    top, tiny = float(finfo.max), float(finfo.tiny)
    kv_a, other = _sides(tensors, scales, num_heads, nope_dim, dtype)

    def fits(j: int, k: int, up: _Side, down: _Side) -> bool:
        f = 2.0**k
        return (
            not bool(up.inexact_small[j])
            and float(up.max_rounded[j]) * f <= top
            and float(down.max_rounded[j]) <= top
            and float(down.min_nonzero[j]) / f >= tiny
        )

    def fit(j: int, e: int) -> int:
        up, down = (kv_a, other) if e > 0 else (other, kv_a)
        k = abs(e)
        while k > 0 and not fits(j, k, up, down):
            k -= 1
        return k if e > 0 else -k

    rank = len(scales.latent)
    latent = [fit(j, e) for j, e in enumerate(scales.latent)]
    rope = [fit(rank + p, e) for p, e in enumerate(scales.rope)]
    return Fp8Scales(latent, rope)
