"""Closed-form least-squares refit of a linear map on calibration activations.

Used to refit ``o_proj`` after conversion: given what the converted attention feeds o_proj (A)
and what the source layer's attention produced (Y), solve
    min_W ||W A - Y||^2 + lam ||W - W0||^2   ->   W (A A^T + lam I) = Y A^T + lam W0
from the accumulated Grams. The ridge term pulls toward the source o_proj, so directions the
calibration text never excites keep their original weights.

For a 70B layer each (8192 x 8192) fp64 matrix is 0.5 GB, so the Grams are updated in place,
the system is solved by Cholesky (one factor, no LU copy, no identity matrix), and the fit's
residuals come from the normal equations instead of new products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROWS = 1024  # row block for elementwise sums (bounds temporaries)


@dataclass(frozen=True)
class RefitResult:
    weight: torch.Tensor  # (out, in), fp64
    rel_error_before: float  # ||W0 A - Y||^2 / ||Y||^2
    rel_error_after: float  # ||W A - Y||^2 / ||Y||^2 (the ridge term not included)


def _inner(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum(a * b) for same-shaped matrices, in fp64, a block of rows at a time."""
    return sum(
        float((a[i : i + ROWS].to(torch.float64) * b[i : i + ROWS].to(torch.float64)).sum())
        for i in range(0, a.shape[0], ROWS)
    )


def ridge_refit(
    gram_in: torch.Tensor,
    cross_out_in: torch.Tensor,
    w0: torch.Tensor,
    lam_rel: float,
    target_energy: float,
) -> RefitResult:
    """W (out x in) from G = A A^T (in x in, fp64), C = Y A^T (out x in, fp64), the prior W0
    and ||Y||^2. G and C are overwritten (they become G + lam I and C + lam W0)."""
    if gram_in.dtype != torch.float64 or cross_out_in.dtype != torch.float64:
        raise TypeError("ridge_refit needs fp64 Grams (they are updated in place)")
    G, C = gram_in, cross_out_in
    E = max(target_energy, 1e-30)
    w0 = w0.to(G.device)
    # ||W0 A - Y||^2 = tr(W0 G W0^T) - 2 tr(W0 C^T) + ||Y||^2
    before = (
        sum(
            float(((w0[i : i + ROWS].double() @ G) * w0[i : i + ROWS].double()).sum())
            for i in range(0, w0.shape[0], ROWS)
        )
        - 2 * _inner(w0, C)
        + target_energy
    )
    lam = lam_rel * float(torch.diagonal(G).mean().clamp(min=1e-12))
    G.diagonal().add_(lam)
    for i in range(0, C.shape[0], ROWS):
        C[i : i + ROWS].add_(w0[i : i + ROWS].double(), alpha=lam)
    factor, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        x = torch.cholesky_solve(C.T, factor)  # W^T, (in x out)
    else:  # not positive definite in floating point (degenerate activations): LU instead
        x = torch.linalg.solve(G, C.T)
    del factor
    w = x.T
    # with W (G + lam I) = R := C + lam W0:
    # tr(W G W^T) = <R, W> - lam |W|^2 and tr(W C^T) = <R, W> - lam <W, W0>
    r_w = _inner(C.T, x)
    after = -r_w - lam * _inner(x, x) + 2 * lam * _inner(w, w0) + target_energy
    return RefitResult(w, max(before, 0.0) / E, max(after, 0.0) / E)
