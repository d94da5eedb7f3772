"""The learning-rate schedule of every training loop in the converter (reconstruction, heal).

One shape, so a reader learns it once: a linear ramp over the first steps (Adam's first moments
are noisy, and a fresh low-rank factorisation should not be kicked hard) times a half cosine
from the peak down to a floor (the last steps polish instead of jumping around the minimum).
"""

from __future__ import annotations

import math


def warmup_cosine(
    step: int, steps: int, warmup: float, floor: float = 0.0, cosine_from: float = 0.0
) -> float:
    """Share of the peak rate at ``step`` (0-based) of ``steps``.

    ``warmup``: steps of the linear ramp (at least 1; may be fractional). The cosine runs from
    1 at step ``cosine_from`` to ``floor`` at ``steps`` and is 1 before ``cosine_from``: 0 lets
    ramp and decay overlap (reconstruction), the warmup length runs them one after the other
    (heal).
    """
    ramp = min(1.0, (step + 1) / warmup)
    span = max(1, steps - cosine_from)
    angle = math.pi * min(max(step - cosine_from, 0), span) / span
    return ramp * (floor + (1 - floor) * 0.5 * (1 + math.cos(angle)))
