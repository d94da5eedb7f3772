"""Closed-form least-squares refit of a linear map on calibration activations.

Used to refit ``o_proj`` after conversion: given what the converted attention feeds o_proj (A)
and what the source layer's attention produced (Y), solve
    min_W ||W A - Y||^2 + lam ||W - W0||^2   ->   W = (Y A^T + lam W0)(A A^T + lam I)^-1
from the accumulated Grams. The ridge term pulls toward the source o_proj, so directions the
calibration text never excites keep their original weights.
"""

from __future__ import annotations

import torch


def ridge_refit(gram_in: torch.Tensor, cross_out_in: torch.Tensor, w0: torch.Tensor,
                lam_rel: float) -> torch.Tensor:
    """W (out x in) from A A^T (in x in), Y A^T (out x in) and the prior W0 (out x in)."""
    gram = gram_in.to(torch.float64)
    n = gram.shape[0]
    lam = lam_rel * float(torch.diagonal(gram).mean().clamp(min=1e-12))
    lhs = gram + lam * torch.eye(n, dtype=torch.float64, device=gram.device)
    rhs = cross_out_in.to(torch.float64) + lam * w0.to(torch.float64)
    return torch.linalg.solve(lhs, rhs.T).T
