"""ECoFLaP: the capped proportional fill against an independent solver, the zeroth-order estimator
(batched and cached) against the naive loop, zeroth-order ranks against true gradient norms, and each
family's loss on tiny models."""
from __future__ import annotations

import math
import random

import pytest
import torch
from tiny_models import make_tiny

from sparsify.allocators.ecoflap import ECoFLaPConfig, capped_fill
from sparsify.allocators.ecoflap_loss import objective_for, unit_loss, units_of
from sparsify.allocators.ecoflap_grads import first_order_scores, group_norms
from sparsify.allocators.ecoflap_scores import Group, ZerothOrder, naive_zeroth_order_scores, zeroth_order_scores
from sparsify.calibrate.batches import calibration_batches
from sparsify.config import CalibConfig
from sparsify.errors import UserError
from sparsify.models.layout import find_blocks, find_targets
from sparsify.models.load import load_model, resolve


def water_fill(n: list[int], score: list[float], keep_total: int, s_max: float) -> list[float]:
    """Independent real-valued solution: keep_g = clip(floor_g + t * score_g, floor_g, n_g), t by bisection."""
    floor = [math.ceil(x * (1 - s_max) - 1e-9) for x in n]
    lo, hi = 0.0, 1.0
    total = lambda t: sum(min(x, f + t * s) for x, f, s in zip(n, floor, score))  # noqa: E731
    while total(hi) < keep_total:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < keep_total else (lo, mid)
    return [min(x, f + hi * s) for x, f, s in zip(n, floor, score)]


@pytest.mark.parametrize("case", range(40))
def test_capped_fill_matches_water_filling_and_is_exact(case):
    rng = random.Random(case)
    groups = rng.randint(2, 9)
    n = [rng.choice([64, 100, 4096, 12345]) for _ in range(groups)]
    score = [rng.uniform(0.01, 3.0) ** 3 for _ in range(groups)]  # skewed: caps bind often
    s = rng.uniform(0.3, 0.8)
    s_max = min(0.99, s + rng.uniform(0.0, 0.2))
    total = round((1 - s) * sum(n))
    names = [f"g{i}" for i in range(groups)]
    keep = capped_fill(dict(zip(names, n)), dict(zip(names, score)), total, s_max)
    assert sum(keep.values()) == total  # the budget, exactly
    real = water_fill(n, score, total, s_max)
    for name, x, r in zip(names, n, real):
        assert math.ceil(x * (1 - s_max) - 1e-9) - 1 <= keep[name] <= x  # the cap (one below only when ceil overshoots)
        if sum(math.ceil(v * (1 - s_max) - 1e-9) for v in n) <= total:
            assert math.ceil(x * (1 - s_max) - 1e-9) <= keep[name]
            assert abs(keep[name] - r) < 1 + 1e-6  # integer rounding of the real solution only


def test_capped_fill_higher_score_keeps_more_and_zero_scores_share_by_room():
    n = {"a": 1000, "b": 1000, "c": 1000}
    keep = capped_fill(n, {"a": 1.0, "b": 2.0, "c": 4.0}, 1500, 0.7)
    assert keep["a"] < keep["b"] < keep["c"] and sum(keep.values()) == 1500
    assert keep["a"] == 300 + round(600 / 7)  # floor 300 each, 600 left in proportion 1:2:4
    even = capped_fill(n, {"a": 0.0, "b": 0.0, "c": 0.0}, 1500, 0.7)
    assert sorted(even.values()) == [500, 500, 500]
    capped = capped_fill(n, {"a": 100.0, "b": 1.0, "c": 1.0}, 2000, 0.9)  # a would take more than it has
    assert capped["a"] == 1000 and capped["b"] == capped["c"] == 500
    assert capped_fill(n, {"a": 5.0, "b": 1.0, "c": 1.0}, 1500, 0.5) == {"a": 500, "b": 500, "c": 500}  # S_max = S


def test_config_rejects_bad_values():
    with pytest.raises(UserError, match="group"):
        ECoFLaPConfig(group="layer")
    with pytest.raises(UserError, match="score"):
        ECoFLaPConfig(score="second")
    with pytest.raises(UserError, match="max_sparsity"):
        ECoFLaPConfig(max_sparsity=1.0)
    with pytest.raises(UserError, match="norm='l3'"):
        ECoFLaPConfig(norm="l3")


def _load(tmp_path, kind, samples=4, seq_len=16, batch_size=2, double=True):
    loaded = load_model(resolve(str(make_tiny(kind, tmp_path / kind))), dtype="float32")
    if double:
        loaded.model.double()
    batches = calibration_batches(loaded, CalibConfig(source="builtin", samples=samples, seq_len=seq_len, seed=0,
                                                      batch_size=batch_size))
    if double:
        batches = [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in batches]
    return loaded, batches


def _groups(model, per="block") -> list[Group]:
    blocks = find_blocks(model)
    prefixes = [p for p, _ in blocks]
    groups = []
    for block, names in find_targets(model).items():
        tower, _, index = block.rpartition(".")
        assert tower in prefixes
        mods = {n: model.get_submodule(n) for n in names}
        if per == "block":
            groups.append(Group(block, mods, tower, int(index)))
        else:
            groups += [Group(n, {n: m}, tower, int(index)) for n, m in mods.items()]
    return groups


@pytest.mark.parametrize("kind,per", [("llama", "block"), ("llama", "matrix"), ("clip", "block"), ("gpt2", "block")])
def test_batched_cached_zeroth_order_equals_the_naive_loop(tmp_path, kind, per):
    """Same directions, same units: equal estimates to float64 rounding (differences ~1e-10 relative at most)."""
    loaded, batches = _load(tmp_path, kind)
    model, objective = loaded.model, objective_for(loaded.family.name)
    groups = _groups(model, per)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # the second run stops as soon as it may (rtol 10: every group draws min_samples = 2, the first after a
    # pilot of 2), so it must draw fewer units than the first, whatever the data's variance
    for settings in (ZerothOrder(rtol=0.0, seed=3, units_per_pass=3), ZerothOrder(rtol=10.0, min_samples=2, seed=3)):
        fast = zeroth_order_scores(model, find_blocks(model), groups, objective, batches, settings)
        naive = naive_zeroth_order_scores(model, groups, objective, batches, settings)
        assert fast.keys() == naive.keys()
        for g in fast:
            assert len(fast[g]) == len(naive[g]) >= 2, g
            assert torch.allclose(torch.tensor(fast[g]), torch.tensor(naive[g]), rtol=1e-6, atol=1e-9), g
        # every group moves the loss (a unit may draw exactly 0 when none of its tokens carries a loss)
        assert all(sum(vals) > 0 for vals in fast.values())
    if kind == "llama":  # the early stop stopped something; the exact run drew every unit
        assert len(fast[groups[0].name]) < len(units_of(objective, batches)) or per == "matrix"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights restored exactly


def _spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_zeroth_order_ranks_groups_like_true_gradient_norms(tmp_path):
    """Per-matrix groups of a tiny Llama: the estimate's mean is sqrt(2/pi) E_u ||g_u||; 96 draws rank them."""
    loaded, batches = _load(tmp_path, "llama", samples=8, seq_len=32, batch_size=4)
    model, objective = loaded.model, objective_for("causal-lm")
    groups = _groups(model, "matrix")
    true = {g.name: 0.0 for g in groups}
    units = units_of(objective, batches)
    params = [m.weight for g in groups for m in g.modules.values()]
    for b, rows in units:
        loss = unit_loss(model, objective, {k: v.clone() for k, v in batches[b].items()}, None, rows, "cpu")
        grads = torch.autograd.grad(loss, params)
        for g, grad in zip(groups, grads):
            true[g.name] += float(grad.norm()) / len(units)
    est = zeroth_order_scores(model, find_blocks(model), groups, objective, batches,
                              ZerothOrder(samples=96, rtol=0.0, seed=0))
    mean = {g: sum(v) / len(v) for g, v in est.items()}
    rho = _spearman([mean[g.name] for g in groups], [true[g.name] for g in groups])
    assert rho >= 0.7, (rho, mean, true)
    ratio = sum(mean.values()) / sum(true.values())  # sqrt(2/pi) = 0.80, within the sampling noise of 96 draws
    assert 0.6 < ratio < 1.0, ratio


def test_first_order_scores_are_mean_over_passes_of_summed_abs_gradient(tmp_path):
    """Each pass's gradient by plain autograd on its rows' summed losses; |.| per pass, then the mean over passes."""
    loaded, batches = _load(tmp_path, "llama")
    model, objective = loaded.model, objective_for("causal-lm")
    modules = {n: m for g in _groups(model) for n, m in g.modules.items()}
    units = units_of(objective, batches)
    weights = [m.weight for m in modules.values()]
    for per_pass in (1, 3):
        scores = first_order_scores(model, modules, objective, batches, rows_per_pass=per_pass)
        weighted = first_order_scores(model, modules, objective, batches, weighted=True, rows_per_pass=per_pass)
        l2 = first_order_scores(model, modules, objective, batches, rows_per_pass=per_pass, norm="l2")
        passes = []
        for u in units:  # consecutive units, at most per_pass, never two batches in one pass
            if passes and len(passes[-1]) < per_pass and passes[-1][-1][0] == u[0]:
                passes[-1].append(u)
            else:
                passes.append([u])
        assert len(passes) == (len(units) if per_pass == 1 else 2)  # 2 batches of 2 rows
        want = dict.fromkeys(modules, 0.0)
        want_w = dict.fromkeys(modules, 0.0)
        want_l2 = dict.fromkeys(modules, 0.0)
        for p in passes:
            loss = sum(unit_loss(model, objective, {k: v.clone() for k, v in batches[b].items()}, None, rows, "cpu")
                       for b, rows in p)
            for (name, m), g in zip(modules.items(), torch.autograd.grad(loss, weights)):
                want[name] += float(g.abs().sum()) / len(passes)
                want_w[name] += float((g * m.weight.detach()).abs().sum()) / len(passes)
                want_l2[name] += math.sqrt(float((g * g).sum())) / len(passes)
        for name, m in modules.items():
            assert scores[name] == pytest.approx(want[name], rel=1e-6)
            assert weighted[name] == pytest.approx(want_w[name], rel=1e-6)
            assert l2[name] == pytest.approx(want_l2[name], rel=1e-6)
            assert not m.weight.requires_grad or m.weight.grad is None  # flags restored, no stale gradients


@pytest.mark.parametrize("kind", ["bert", "vit", "clip", "dinov2", "siglip"])
def test_every_family_has_a_loss_with_a_gradient(tmp_path, kind):
    """The scored loss of each family is finite and moves every block (a zero gradient would rank nothing)."""
    loaded, batches = _load(tmp_path, kind, double=False)
    model, objective = loaded.model, objective_for(loaded.family.name)
    groups = _groups(model)
    modules = {n: m for g in groups for n, m in g.modules.items()}
    scores = first_order_scores(model, modules, objective, batches)
    assert all(math.isfinite(v) for v in scores.values())
    per_block = {g.name: sum(scores[n] for n in g.modules) for g in groups}
    assert len(per_block) >= 2 and all(v > 0 for v in per_block.values()), per_block


def test_group_norm_scores_are_the_norm_of_each_pass_block_gradient(tmp_path):
    """norm=group: per pass, the Euclidean norm of the whole block's gradient (autograd), then the mean over passes;
    per-pass values average to the plain scores."""
    loaded, batches = _load(tmp_path, "llama")
    model, objective = loaded.model, objective_for("causal-lm")
    groups = _groups(model)
    modules = {n: m for g in groups for n, m in g.modules.items()}
    per_pass = first_order_scores(model, modules, objective, batches, norm="l2", per_pass=True)
    plain = first_order_scores(model, modules, objective, batches, norm="l2")
    assert all(sum(v) / len(v) == pytest.approx(plain[n], rel=1e-12) for n, v in per_pass.items())
    got = group_norms(per_pass, groups)
    units = units_of(objective, batches)
    want = {g.name: 0.0 for g in groups}
    for b, rows in units:
        loss = unit_loss(model, objective, {k: v.clone() for k, v in batches[b].items()}, None, rows, "cpu")
        for g in groups:
            grads = torch.autograd.grad(loss, [m.weight for m in g.modules.values()], retain_graph=True)
            want[g.name] += math.sqrt(sum(float((x * x).sum()) for x in grads)) / len(units)
    for g in groups:
        assert got[g.name] == pytest.approx(want[g.name], rel=1e-6)
        assert got[g.name] < sum(plain[n] for n in g.modules)  # a norm, not the sum of the matrices' norms
