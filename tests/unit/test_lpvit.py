"""LPViT allocation: closed-form distortion curves against brute force, the equal-slope solver on
synthetic curves with a known optimum, the direction of the hardware cost term, whole-tile rounding."""
from __future__ import annotations

import pytest
import torch

from sparsify.allocators import lpvit_curves as curves
from sparsify.allocators.lpvit import LPViTConfig, allocate_curves, sparsity_of
from sparsify.allocators.lpvit_solver import monotone, solve, whole_tiles
from sparsify.errors import UserError
from sparsify.eval import costs
from sparsify.eval.latency import timeit
from sparsify.pruners.masks import block_mask


def _brute(w: torch.Tensor, g: torch.Tensor, block, k: int, lam: float) -> tuple[float, torch.Tensor]:
    """D with the k lowest tiles (mean |W g| over each tile's real elements) actually removed, tile by tile."""
    (r, c), (out, inp) = block, w.shape
    tiles = [(i, j) for i in range(0, out, r) for j in range(0, inp, c)]  # row-major, as block_mask
    score = torch.tensor([(w[i:i + r, j:j + c] * g[i:i + r, j:j + c]).abs().mean().item() for i, j in tiles])
    removed = torch.zeros_like(w, dtype=torch.bool)
    for t in score.argsort(stable=True)[:k].tolist():
        i, j = tiles[t]
        removed[i:i + r, j:j + c] = True
    dw = torch.where(removed, w, torch.zeros_like(w))  # (out, in) the removed weights
    d = ((g * dw) ** 2).mean() + 0.5 * (g * dw).sum() ** 2 + 0.5 * lam * (dw ** 2).sum()
    return float(d), removed


@pytest.mark.parametrize("shape,block", [((48, 64), (16, 16)), ((37, 50), (8, 16))])  # the second pads edge tiles
def test_closed_form_distortion_equals_brute_force(shape, block):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.1
    lam = 1e-3  # larger than the default so that the ||dW||^2 term is visible in the check
    curve = curves.tile_curve(w, g, block, lam).distortion()  # (tiles + 1,)
    for k in range(curve.numel()):
        d, removed = _brute(w, g, block, k, lam)
        assert curve[k].item() == pytest.approx(d, rel=1e-10, abs=1e-14)
        if k == curve.numel() - 1:
            continue  # a plan's sparsity is below 1: every tile gone is not a plan
        # block_mask ranking by the same score drops exactly these tiles
        keep = block_mask((w * g).abs(), block, sparsity_of(k, curve.numel() - 1))
        assert torch.equal(~keep, removed)


def test_grid_curve_is_exact_at_whole_tiles_and_linear_between():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(80, 80, generator=gen, dtype=torch.float64)
    g = torch.randn(80, 80, generator=gen, dtype=torch.float64)
    s = curves.grid(0.01)
    d = curves.distortion_curve(w, g, (8, 8), s)  # 100 tiles: grid point i = i tiles removed
    for i in (0, 1, 37, 99, 100):
        assert d[i].item() == pytest.approx(_brute(w, g, (8, 8), i, curves.LAMBDA)[0], rel=1e-10)
    per_tile = curves.tile_curve(w, g, (32, 32)).distortion()  # 9 tiles: grid points fall between tiles
    half = curves.at_grid(per_tile, torch.tensor([1.5 / 9], dtype=torch.float64))
    assert half.item() == pytest.approx(((per_tile[1] + per_tile[2]) / 2).item(), rel=1e-12)


def _synthetic(a: list[float], numel: list[int], step: float = 0.01):
    """D_l(s) = a_l s^2 on the grid: slope 2 a_l s, so equal slopes t give s_l = t / (2 a_l)."""
    s = curves.grid(step)
    names = [f"l{i}" for i in range(len(a))]
    slopes = {n: curves.slope(ai * s ** 2, s) for n, ai in zip(names, a)}
    kept = {n: m * (1 - s) for n, m in zip(names, numel)}
    return s, slopes, kept


def test_solver_meets_the_budget_and_slopes_are_equal():
    a = [0.5, 1, 2, 3, 5, 8, 13, 0.7, 1.5, 4]
    numel = [4096, 4096, 8192, 8192, 4096, 16384, 4096, 8192, 4096, 8192]
    s, slopes, kept = _synthetic(a, numel)
    cap = {n: 95 for n in slopes}
    for frac in (0.3, 0.5, 0.7):
        target = frac * sum(numel)
        sol = solve(slopes, kept, s, target, cap)
        assert abs(sol.kept - target) <= 0.01 * target
        for n, i in sol.index.items():
            d = monotone(slopes[n])
            if 0 < i < cap[n]:  # unsaturated: the slope there is t, up to one grid step of the curve
                assert abs(d[i] - sol.t) <= max(d[i + 1] - d[i], d[i] - d[i - 1]) + 1e-12
        # the known optimum: s_l = t / (2 a_l), more sparsity where the curve is flatter
        for (n, i), ai in zip(sol.index.items(), a):
            if 0 < i < cap[n]:
                assert abs(s[i].item() - sol.t / (2 * ai)) <= 0.01 + 1e-9
        order = sorted(range(len(a)), key=lambda j: a[j])
        got = [sol.sparsity[f"l{j}"] for j in order]
        assert all(x >= y - 1e-9 for x, y in zip(got, got[1:]))


def test_whole_tiles_meet_the_target_within_one_tile():
    gen = torch.Generator().manual_seed(3)
    tile = {f"l{i}": curves.tile_curve(torch.randn(64, 64 * (1 + i % 2), generator=gen),
                                       torch.randn(64, 64 * (1 + i % 2), generator=gen), (16, 16)) for i in range(6)}
    obj = {n: c.distortion() for n, c in tile.items()}
    kept = {n: c.numel - c.removed for n, c in tile.items()}
    dense = sum(c.numel for c in tile.values())
    k = whole_tiles(obj, kept, {n: 0.3 for n in tile}, 0.5 * dense, {n: c.tiles - 1 for n, c in tile.items()})
    got = sum(float(kept[n][k[n]]) for n in tile)
    assert abs(got - 0.5 * dense) <= 256 / 2  # half of one 16x16 tile


def _twins(tokens_b: float):
    """Two layers with the same weights and gradients; b sees ``tokens_b`` times as many tokens as a."""
    gen = torch.Generator().manual_seed(4)
    w, g = torch.randn(64, 128, generator=gen), torch.randn(64, 128, generator=gen)
    c = curves.tile_curve(w, g, (16, 16))
    return {"a": c, "b": c}, {"a": 1.0, "b": tokens_b}


@pytest.mark.parametrize("cost", ["flops", "blocks"])
def test_cost_term_prunes_costly_layers_more(cost):
    if cost == "flops":
        tile, tokens = _twins(4.0)  # b's blocks cost 4x the FLOPs
        costly, cheap = "b", "a"
    else:
        gen = torch.Generator().manual_seed(5)
        w, g = torch.randn(64, 128, generator=gen), torch.randn(64, 128, generator=gen)
        big, small = curves.tile_curve(w, g, (16, 16)), curves.tile_curve(w, g, (16, 32))  # 32 vs 16 tiles
        tile, tokens = {"big": big, "small": small}, {"big": 1.0, "small": 1.0}
        costly, cheap = "big", "small"
    plan = {n: 0.5 for n in tile}
    spread = []
    for beta in (0.0, 1.0, 4.0):
        removed, info = allocate_curves(tile, tokens, plan, LPViTConfig(cost=cost, beta=beta))
        assert abs(info["achieved"] - info["target"]) <= 0.01
        s = {n: removed[n] / tile[n].tiles for n in tile}
        spread.append(s[costly] - s[cheap])
    assert spread[0] < spread[1] <= spread[2] and spread[2] > 0
    if cost == "flops":
        assert abs(spread[0]) <= 1 / 32 + 1e-9  # twins: equal sparsity (one tile) without the cost term


def test_flops_budget_counts_tokens():
    tile, tokens = _twins(3.0)
    removed, info = allocate_curves(tile, tokens, {"a": 0.0, "b": 0.0}, LPViTConfig(flops_kept=0.6, beta=0.0))
    kept = sum((tile[n].numel - tile[n].removed[removed[n]].item()) * tokens[n] for n in tile)
    assert abs(kept / sum(c.numel * tokens[n] for n, c in tile.items()) - 0.6) <= 0.01
    assert info["budget"] == "flops"


def test_config_errors_are_user_errors():
    for bad in ({"cost": "measured"}, {"costs": "f.json"}, {"cost": "watts"}, {"flops_kept": 1.5}, {"step": 0.3}, {"max_sparsity": 1.0}, {"slope": "x"}):
        with pytest.raises(UserError):
            LPViTConfig(**bad)


def _table(entries):
    return {"kind": costs.KIND, "tokens": 8, "layers": [{"shape": s, "block": b, "kept": k, "ms": ms}
                                                        for s, b, k, ms in entries]}


def test_latency_curve_interpolates_and_is_monotone():
    """Linear between the measured kept fractions, by tiles removed; a dip (noise) is flattened."""
    table = _table([([64, 128], [16, 16], [1.0, 0.0, 0.5], [10.0, 2.0, 7.0]),
                    ([64, 128], [16, 32], [0.0, 0.5, 0.75, 1.0], [1.0, 5.0, 4.0, 9.0])])
    c = costs.latency_curve(table, [64, 128], (16, 16), 32)  # 32 tiles
    assert c.shape == (33,) and c[0] == 10.0 and c[32] == 2.0 and c[16] == 7.0
    assert c[8] == pytest.approx(7.0 + 0.5 * 3.0)  # kept 0.75: halfway between 0.5 and 1.0
    assert c[24] == pytest.approx(2.0 + 0.5 * 5.0)
    d = costs.latency_curve(table, [64, 128], [16, 32], 16)
    assert (d[:-1] >= d[1:]).all() and d[4] == 5.0  # kept 0.75 measured 4.0 < 5.0 at 0.5: raised to 5.0
    with pytest.raises(UserError, match="no timing for a 128x64 layer"):
        costs.latency_curve(table, [128, 64], [16, 16], 32)


def test_measured_cost_prunes_slow_layers_more():
    """Twins whose measured tiles cost 1 and 4 ms each: the cost term prunes the slow one more."""
    tile, tokens = _twins(1.0)
    n = tile["a"].tiles
    kept = torch.arange(n, -1, -1, dtype=torch.float64)  # (tiles + 1,) tiles surviving by tiles removed
    latency = {"a": 0.5 + 1.0 * kept, "b": 0.5 + 4.0 * kept}
    spread = []
    for beta in (0.0, 1.0, 4.0):
        removed, info = allocate_curves(tile, tokens, {"a": 0.5, "b": 0.5}, LPViTConfig(cost="measured", costs="x",
                                                                                         beta=beta), latency)
        assert abs(info["achieved"] - info["target"]) <= 0.01
        spread.append((removed["b"] - removed["a"]) / n)
    assert abs(spread[0]) <= 1 / n + 1e-9 and spread[0] < spread[1] <= spread[2] and spread[2] > 0


def test_latency_file_measure_save_load(tmp_path):
    """A real (tiny) measurement through the dispatch; the file round-trips; bad files are one-line errors."""
    table = costs.measure([((40, 48), (16, 16))], tokens=3, timeit=timeit, reps=1)
    (entry,) = table["layers"]
    assert entry["kept"] == list(costs.KEPT) and len(entry["ms"]) == len(costs.KEPT) and min(entry["ms"]) > 0
    assert entry["kernel"][1] in ("cpu-bsr-c", "cpu-bsr") and entry["kernel"][-1] in ("cpu-unpack", "dense-cached")
    path = costs.save(table, tmp_path / "lat.json")
    assert costs.load(path) == table
    assert not list(tmp_path.glob(".lat.json.tmp-*"))
    with pytest.raises(UserError, match="refusing"):
        costs.save(table, tmp_path / "sparsify.json")
    (tmp_path / "bad.json").write_text('{"rules": []}')
    with pytest.raises(UserError, match="--save-costs FILE"):
        costs.load(tmp_path / "bad.json")
    with pytest.raises(UserError, match="not a latency file"):
        costs.load(tmp_path / "missing.json")
