"""The zeroth-order early stop (`sparsify.allocators.ecoflap_stop`): counts fixed before a group draws, no bias."""
from __future__ import annotations

import math
import random

from sparsify.allocators.ecoflap_stop import HALF_NORMAL_CV, Pool, draws_needed, planned_draws


def _slow_cv(groups: list[list[float]]) -> float:
    """Pooled coefficient of variation by its definition: each group's draws over its own mean, pooled variance."""
    num = den = 0
    for values in groups:
        m = sum(values) / len(values)
        rel = [v / m for v in values]
        r = sum(rel) / len(rel)  # = 1
        num += sum((x - r) ** 2 for x in rel)
        den += len(rel) - 1
    return math.sqrt(num / den)


def test_pool_cv_matches_the_definition_on_random_groups():
    rng = random.Random(0)
    for _ in range(20):
        groups = [[abs(rng.gauss(0, rng.uniform(0.1, 5))) for _ in range(rng.randint(2, 40))]
                  for _ in range(rng.randint(1, 6))]
        pool = Pool()
        for values in groups:
            pool.add(values)
        assert math.isclose(pool.cv, _slow_cv(groups), rel_tol=1e-12)


def test_pool_ignores_groups_that_say_nothing_about_spread():
    pool = Pool()
    pool.add([])
    pool.add([3.0])  # one draw: no spread
    pool.add([0.0, 0.0, 0.0])  # a loss that never moved
    assert pool.cv is None and pool.dof == 0


def test_draws_needed_is_the_relative_error_formula_clamped():
    assert draws_needed(0.76, 0.2, 8, 32) == math.ceil((0.76 / 0.2) ** 2) == 15
    assert draws_needed(0.76, 0.5, 8, 32) == 8  # at least min_samples
    assert draws_needed(0.76, 0.1, 8, 32) == 32  # at most every draw
    assert draws_needed(0.5, 0.25, 1, 100) == 4  # (0.5 / 0.25)^2 = 4 exactly, not 5 from rounding


class Recorder:
    """A draw function over fixed per-index values that records which indices each group asked for."""

    def __init__(self, values: dict[int, float]):
        self.values, self.asked = values, []

    def __call__(self, samples: range) -> list[float]:
        self.asked.append(samples)
        return [self.values[s] for s in samples]


def test_first_group_draws_a_pilot_that_only_feeds_the_pool():
    rng = random.Random(1)
    values = {s: abs(rng.gauss(0, 1)) for s in range(40)}
    pool, draw = Pool(), Recorder(values)
    got = planned_draws(draw, pool, rtol=0.2, min_samples=8, most=32)
    pilot = [values[s] for s in range(32, 40)]
    assert draw.asked[0] == range(32, 40) and pool.pilot == pilot
    n = draws_needed(max(_slow_cv([pilot]), HALF_NORMAL_CV), 0.2, 8, 32)
    assert draw.asked[1] == range(n) and got == [values[s] for s in range(n)]  # the pilot is not in the estimate
    assert math.isclose(pool.cv, _slow_cv([pilot, got]), rel_tol=1e-12)


def test_a_groups_own_draws_never_decide_its_count():
    """The second group's count comes from the first group's spread alone: scaling or reshuffling its own values
    (the old rule stopped early on high, alike draws) changes nothing."""
    rng = random.Random(2)
    first = {s: abs(rng.gauss(0, 1)) for s in range(40)}
    counts = []
    for own in ({s: 5.0 + 0.01 * s for s in range(32)}, {s: abs(rng.gauss(0, 3)) for s in range(32)}):
        pool = Pool()
        planned_draws(Recorder(first), pool, 0.2, 8, 32)
        expected = draws_needed(max(pool.cv, HALF_NORMAL_CV), 0.2, 8, 32)
        counts.append(len(planned_draws(Recorder(own), pool, 0.2, 8, 32)))
        assert counts[-1] == expected
    assert counts[0] == counts[1]


def test_a_pool_below_the_half_normal_floor_counts_as_the_floor():
    """Alike draws (cv 0.1) cannot mean a group converges sooner than half-normal draws could: the count uses 0.756."""
    pool = Pool()
    pool.add([1.0, 1.1, 0.9, 1.0, 1.1, 0.9, 1.0, 1.0])
    assert pool.cv < 0.1
    draw = Recorder({s: 1.0 for s in range(32)})
    assert len(planned_draws(draw, pool, 0.2, 8, 32)) == draws_needed(HALF_NORMAL_CV, 0.2, 8, 32) == 15


def test_no_pilot_when_the_half_normal_alone_needs_every_draw():
    assert draws_needed(HALF_NORMAL_CV, 0.1, 8, 32) == 32  # the default rtol on 32 units
    draw = Recorder({s: 1.0 + s for s in range(32)})
    got = planned_draws(draw, Pool(), rtol=0.1, min_samples=8, most=32)
    assert draw.asked == [range(32)] and len(got) == 32
    draw = Recorder({s: 1.0 for s in range(32)})
    assert len(planned_draws(draw, Pool(), rtol=0.0, min_samples=8, most=32)) == 32  # rtol 0: every draw


def test_pooled_rule_is_unbiased_where_stopping_on_own_draws_is_not():
    """Half-normal draws around 1 (sigma = 1 / sqrt(2/pi)): the mean of 4000 groups' estimates under the pooled rule
    is 1 within 4 standard errors; stopping a group when its own standard error is below rtol * its own mean is
    biased (the rule this replaced). Seeded, so the test is deterministic; the tolerance is the sampling error."""
    rng = random.Random(3)
    sigma = 1 / math.sqrt(2 / math.pi)
    pooled, own, sizes = [], [], []
    pool = Pool()
    for _ in range(4000):
        values = {s: abs(rng.gauss(0, sigma)) for s in range(40)}
        est = planned_draws(Recorder(values), pool, 0.2, 8, 32)
        pooled.append(sum(est) / len(est))
        sizes.append(len(est))
        for n in range(8, 33):  # the old rule, checked after every draw
            xs = [values[s] for s in range(n)]
            m = sum(xs) / n
            if math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) <= 0.2 * m or n == 32:
                own.append(m)
                break
    se = HALF_NORMAL_CV / math.sqrt(min(sizes)) / math.sqrt(len(pooled))  # the largest a mean's error can be
    assert abs(sum(pooled) / len(pooled) - 1) < 4 * se
    assert sum(own) / len(own) - 1 > 4 * se  # biased upwards (+2% here, 6 standard errors)
    assert min(sizes) >= 15 and set(sizes[100:]) <= {15, 16}  # (0.756 / 0.2)^2 = 14.3 at the floor
