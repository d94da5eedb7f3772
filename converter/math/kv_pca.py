"""Balanced joint PCA of [K_nope; V] into one latent of rank rho (method.md section 3).

K_nope usually carries far more energy than V, so a plain joint PCA would spend the latent on
keys; dividing K_nope by the ratio s of per-dim RMS norms makes both halves weigh the same.
Everything is computed from the (2L, 2L) second moment of [k; v], so no activations are stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_TINY = 1e-12
# K_nope carrying less than this fraction of the key energy is rounding noise (it happens when
# the rope part holds every key exactly); balancing would blow that noise up to the size of V.
NOISE_FLOOR = 1e-6


@dataclass(frozen=True)
class LatentBasis:
    """Top-rho directions R of z = [k_nope / s; v]; latent c = R^T z."""

    basis: torch.Tensor  # ((L - r) + L, rho)
    key_scale: float  # s
    nope_dim: int  # L - r
    latent_energy_fraction: float

    @property
    def key_part(self) -> torch.Tensor:
        return self.basis[: self.nope_dim]

    @property
    def value_part(self) -> torch.Tensor:
        return self.basis[self.nope_dim :]


def max_rank(kv_width: int, rope_dim: int) -> int:
    """Largest useful latent rank: the dimension of [K_nope; V], 2L - r."""
    return 2 * kv_width - rope_dim


def balanced_kv_basis(
    kv_gram: torch.Tensor, key_nope_map: torch.Tensor, rank: int, damping: float = 1e-12
) -> LatentBasis:
    """PCA basis of the balanced [k_nope; v] given the (2L, 2L) Gram of [k; v].

    ``key_nope_map`` is the (L - r, L) block of the key rotation that yields k_nope.
    Degenerate inputs (no energy in K_nope or V, rank-deficient moments) give a finite basis.
    """
    gram = kv_gram.to(torch.float64)
    width = gram.shape[0] // 2
    nope_map = key_nope_map.to(torch.float64)
    nope_dim = nope_map.shape[0]
    if not 1 <= rank <= nope_dim + width:
        raise ValueError(f"latent rank {rank} must lie in [1, {nope_dim + width}]")
    # second moment of [k_nope; v] = [[N Gkk N^T, N Gkv], [Gvk N^T, Gvv]], block by block (a
    # dense lift matrix would cost ~4x the flops: about 1 s per call at 8 KV heads x 128)
    moment = torch.empty(nope_dim + width, nope_dim + width, dtype=torch.float64)
    moment[:nope_dim, :nope_dim] = nope_map @ gram[:width, :width] @ nope_map.T
    moment[:nope_dim, nope_dim:] = nope_map @ gram[:width, width:]
    moment[nope_dim:, :nope_dim] = gram[width:, :width] @ nope_map.T
    moment[nope_dim:, nope_dim:] = gram[width:, width:]
    diag = torch.diagonal(moment).clamp(min=0)
    nope_energy, v_energy = float(diag[:nope_dim].sum()), float(diag[nope_dim:].sum())
    key_energy = float(torch.diagonal(gram)[:width].clamp(min=0).sum())
    scale = 1.0
    if nope_dim and nope_energy > NOISE_FLOOR * key_energy and v_energy > _TINY:
        scale = ((nope_energy / nope_dim) / (v_energy / width)) ** 0.5
    balance = torch.ones(nope_dim + width, dtype=torch.float64)
    balance[:nope_dim] = 1.0 / scale
    moment = moment * balance[:, None] * balance[None, :]
    moment = 0.5 * (moment + moment.T)
    total = float(torch.diagonal(moment).sum())
    jitter = damping * max(total, _TINY) / moment.shape[0]
    evals, evecs = torch.linalg.eigh(
        moment + jitter * torch.eye(moment.shape[0], dtype=torch.float64)
    )
    order = torch.argsort(evals, descending=True)[:rank]
    kept = float((evals[order] - jitter).clamp(min=0).sum())
    fraction = min(kept / total, 1.0) if total > 0 else 1.0
    return LatentBasis(evecs[:, order].contiguous(), scale, nope_dim, fraction)
