"""How many zeroth-order draws each ECoFLaP group takes: the early stop (`ZerothOrder.rtol`), without bias.

One draw |L(W + eps z) - L(W - eps z)| / (2 eps) is half-normal around sqrt(2 / pi) times the group's
gradient norm, a coefficient of variation (cv) of sqrt(pi / 2 - 1) = 0.756, spread a little further by the
calibration units: with g_u unit u's gradient, cv^2 = (pi / 2) E||g_u||^2 / (E||g_u||)^2 - 1 >= pi / 2 - 1
(Jensen), so 0.756 is a floor, never an estimate to go below. A mean of n draws has a relative standard error
of cv / sqrt(n), and it has converged to ``rtol`` once n >= (cv / rtol)^2.

Stopping a group when its *own* draws' standard error falls below ``rtol`` times their *own* mean is biased:
a group whose first draws happen to be large and alike stops early with a high score (measured on SmolLM2:
the worst allocation of the rules tried, bench/ecoflap_draws.py). Here a group's draw count is fixed before
its first draw, from the cv pooled over the groups scored before it (each group's draws taken relative to
its own mean; at least the floor, which a pool of few draws can undershoot), so its own draws never decide
when it stops. The first group has no group before it: it first draws a pilot of ``min_samples`` draws
with directions of their own (sample indices after those of every real draw), which only feed the pool.
When even the floor would need every draw, there is no pilot and every group draws them all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

HALF_NORMAL_CV = math.sqrt(math.pi / 2 - 1)  # 0.756: the least spread the draws can have


@dataclass
class Pool:
    """The relative spread of the draws of the groups scored so far (pilot draws included)."""

    squares: float = 0.0  # sum over groups and draws of (value / group mean - 1)^2
    dof: int = 0  # sum over groups of (draws - 1)
    pilot: list[float] = field(default_factory=list)

    def add(self, values: list[float]) -> None:
        n = len(values)
        mean = sum(values) / n if n else 0.0
        if n < 2 or mean <= 0:  # a group whose loss never moved says nothing about the spread
            return
        self.squares += sum((v / mean - 1) ** 2 for v in values)
        self.dof += n - 1

    @property
    def cv(self) -> float | None:
        return math.sqrt(self.squares / self.dof) if self.dof else None


def draws_needed(cv: float, rtol: float, min_samples: int, most: int) -> int:
    """Draws for a relative standard error of at most ``rtol`` at coefficient of variation ``cv``, in [min_samples, most]."""
    return min(most, max(min_samples, math.ceil((cv / rtol) ** 2 - 1e-9)))


def planned_draws(draw: Callable[[range], list[float]], pool: Pool, rtol: float, min_samples: int,
                  most: int) -> list[float]:
    """One group's draws: ``draw(sample indices)`` returns their values; ``most`` draws at most (indices 0..most-1).

    The count is decided before the group's first real draw (a pilot at indices most.. when ``pool`` is empty);
    the group's draws then join ``pool`` for the groups after it.
    """
    if rtol > 0 and draws_needed(HALF_NORMAL_CV, rtol, min_samples, most) < most:
        if pool.cv is None:
            pilot = draw(range(most, most + min_samples))
            pool.pilot += pilot
            pool.add(pilot)
        n = most if pool.cv is None else draws_needed(max(pool.cv, HALF_NORMAL_CV), rtol, min_samples, most)
    else:
        n = most
    values = draw(range(n))
    pool.add(values)
    return values
