"""One schedule, two uses: warmup_cosine gives reconstruction and heal the rates they had when
each wrote its own formula (the closed forms below): reconstruction bit for bit, so no
conversion changed, heal to rounding."""

import math

import pytest

from converter.heal.loop import FLOOR, WARMUP, learning_rate
from converter.math.schedule import warmup_cosine


def reconstruction_before(step: int, total: int, warm: float) -> float:
    """reconstruct.py's LambdaLR factor before the unification: ramp and cosine overlap."""
    return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def heal_before(step: int, steps: int, lr: float) -> float:
    """heal/loop.py's rate before the unification: warmup, then cosine down to FLOOR x lr."""
    warm = max(1, round(WARMUP * steps))
    if step < warm:
        return lr * (step + 1) / warm
    done = (step - warm) / max(1, steps - warm)
    return lr * (FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * done)))


@pytest.mark.parametrize("total", [1, 2, 7, 24, 30, 97, 1000])
def test_reconstruction_rates_unchanged_bit_for_bit(total: int) -> None:
    warm = max(1.0, 0.1 * total)
    for step in range(total + 3):  # LambdaLR is also evaluated once past the last step
        assert warmup_cosine(step, total, warm) == reconstruction_before(step, total, warm)


@pytest.mark.parametrize("steps", [1, 3, 20, 30, 61, 500])
@pytest.mark.parametrize("lr", [1e-3, 3e-4, 0.01])
def test_heal_rates_unchanged(steps: int, lr: float) -> None:
    for step in range(steps):
        got, want = learning_rate(step, steps, lr), heal_before(step, steps, lr)
        # the same formula grouped differently (pi * x / n, not pi * (x / n)): a few ulps apart;
        # the grouping kept exact is reconstruction's, whose outputs are pinned byte for byte
        assert got == pytest.approx(want, rel=1e-14, abs=0), (step, steps)


def test_shape() -> None:
    """The ramp reaches the peak, the cosine ends at the floor and never goes below it."""
    rates = [warmup_cosine(s, 100, 10, floor=0.1, cosine_from=10) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == 1.0 and rates[10] == 1.0
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    assert min(rates[10:]) > 0.1 and warmup_cosine(100, 100, 10, 0.1, 10) == pytest.approx(0.1)
