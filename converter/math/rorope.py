"""RoRoPE with FreqFold: rotate the KV heads' keys so RoPE lives in a few shared dims.

At one frequency the same 2-D rotation acts on every KV head's (j, j+d/2) pair, so any real
orthogonal mixing of the heads' pairs commutes with RoPE and leaves q.k unchanged. PCA of the
calibration keys picks the mixing that puts most key energy in the first components; those keep
RoPE, the rest become position-free ("nope"). FreqFold pools f neighbouring frequencies into one
PCA, trading frequency exactness for energy (method.md section 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeyRotation:
    """Orthogonal map k (L = G*d, HF neox layout per head) -> k' = [rope (r, interleaved); nope].

    ``matrix`` is (L, L); rows [0, r) are the rope key in GPT-J interleaved layout (row 2m is the
    real and 2m+1 the imaginary part of the component that turns at frequency m of an r-dim rope),
    rows [r, L) the nope components.
    """

    matrix: torch.Tensor
    rope_dim: int
    rope_energy_fraction: float

    @property
    def rope(self) -> torch.Tensor:
        return self.matrix[: self.rope_dim]

    @property
    def nope(self) -> torch.Tensor:
        return self.matrix[self.rope_dim :]


def valid_freqfolds(head_dim: int, rope_dim: int) -> list[int]:
    """All FreqFold values allowed for (d, r): f a multiple of c = d/r that divides d/2."""
    if rope_dim <= 0 or rope_dim % 2 or head_dim % rope_dim:
        return []
    collapse = head_dim // rope_dim
    half = head_dim // 2
    return [f for f in range(collapse, half + 1, collapse) if half % f == 0]


def check_rope_settings(head_dim: int, rope_dim: int, freqfold: int) -> None:
    """Raise ValueError with the allowed values when (d, r, f) cannot be converted."""
    if rope_dim <= 0 or rope_dim % 2 or head_dim % rope_dim:
        divisors = [x for x in range(2, head_dim + 1, 2) if head_dim % x == 0]
        raise ValueError(
            f"--rope-dim {rope_dim} must be an even divisor of head_dim {head_dim} "
            f"(one of {divisors})"
        )
    allowed = valid_freqfolds(head_dim, rope_dim)
    if freqfold not in allowed:
        raise ValueError(
            f"--freqfold {freqfold} is not compatible with head_dim {head_dim} and "
            f"--rope-dim {rope_dim}: it must be a multiple of {head_dim // rope_dim} "
            f"that divides {head_dim // 2} (one of {allowed})"
        )


def default_freqfold(head_dim: int, rope_dim: int) -> int:
    """The smallest valid FreqFold: the least frequency mixing the rope budget allows."""
    allowed = valid_freqfolds(head_dim, rope_dim)
    if not allowed:
        check_rope_settings(head_dim, rope_dim, 0)
    return allowed[0]


def key_rotation(
    key_gram: torch.Tensor, num_kv_heads: int, head_dim: int, rope_dim: int, freqfold: int
) -> KeyRotation:
    """Build the RoRoPE rotation from the (L, L) uncentered second moment of calibration keys."""
    check_rope_settings(head_dim, rope_dim, freqfold)
    gram = key_gram.to(torch.float64)
    heads, d, f = num_kv_heads, head_dim, freqfold
    half, collapse = d // 2, d // rope_dim
    width = gram.shape[0]
    if width != heads * d:
        raise ValueError(f"key Gram is {width}x{width}, expected {heads * d}")
    kept_per_group = f // collapse
    rows = torch.zeros(width, width, dtype=torch.float64)
    nope_rows: list[torch.Tensor] = []
    kept_energy = 0.0
    for group in range(half // f):
        freqs = torch.arange(group * f, (group + 1) * f)
        re_idx = (torch.arange(heads)[:, None] * d + freqs[None, :]).reshape(-1)
        im_idx = re_idx + half
        moment = gram[re_idx][:, re_idx] + gram[im_idx][:, im_idx]
        evals, evecs = torch.linalg.eigh(moment)
        order = torch.argsort(evals, descending=True)
        evals, evecs = evals[order], evecs[:, order]
        for comp in range(evecs.shape[1]):
            re_row = torch.zeros(width, dtype=torch.float64)
            im_row = torch.zeros(width, dtype=torch.float64)
            re_row[re_idx] = evecs[:, comp]
            im_row[im_idx] = evecs[:, comp]
            if comp < kept_per_group:
                m = group * kept_per_group + comp  # frequency index of the r-dim rope
                rows[2 * m], rows[2 * m + 1] = re_row, im_row
                kept_energy += float(evals[comp].clamp(min=0))
            else:
                nope_rows += [re_row, im_row]
    if nope_rows:
        rows[rope_dim:] = torch.stack(nope_rows)
    total = float(torch.diagonal(gram).sum())
    fraction = kept_energy / total if total > 0 else 1.0
    return KeyRotation(rows, rope_dim, min(fraction, 1.0))
