"""LPViT's equal-slope (Pareto) solver, and the rounding of its answer to whole blocks.

Given each layer's objective slope d_l(s) on a sparsity grid (dJ/ds, J = D + beta * P) and what each
grid point keeps of the budget quantity (FLOPs or parameters), a multiplier t makes every layer pick
s_l(t) = argmin_s |d_l(s) - t| up to its cap (on a flat stretch: its far end, see `pick`). The
slopes are first made non-decreasing (a running max, since a curve need not be convex), so that
s_l(t) grows with t and the kept total falls with it; bisection on log t then finds the t whose total meets the target. The
layers that jump between the two bracketing t share the remaining gap in proportion (a fraction of a
grid step), so the grid answer meets the target up to rounding. `whole_tiles` then turns sparsities
into whole tiles per layer and closes the gap greedily by the cheapest objective per unit of budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Solution:
    t: float  # the multiplier of the bracket's pruning side
    index: dict[str, int]  # grid index per layer at t (each layer's slope closest to t)
    sparsity: dict[str, float]  # after sharing the remaining gap (may lie between grid points)
    kept: float  # budget quantity kept at ``sparsity``


def monotone(d: torch.Tensor) -> torch.Tensor:
    """(G,) running max of a slope curve: non-decreasing, equal to d wherever d already was."""
    return d.cummax(0).values


def pick(d: torch.Tensor, t: float, cap: int) -> int:
    """Grid index in [0, cap] whose (non-decreasing) slope is closest to t.

    The candidates are the last point with slope <= t and the one after it, so that on a flat stretch
    of the envelope (slope == v) any t above v goes to its end: every point of it costs less than t.
    """
    d = d[:cap + 1]
    j = int(torch.searchsorted(d, torch.tensor([t], dtype=d.dtype), right=True)) - 1  # last with d <= t
    if j < 0:
        return 0
    if j == cap:
        return cap
    return j if t - float(d[j]) <= float(d[j + 1]) - t else j + 1


def kept_at(kept: torch.Tensor, s: torch.Tensor, x: float) -> float:
    """The (G,) kept curve on the grid ``s`` read at sparsity x (linear between grid points)."""
    i = min(int(x / float(s[1])), s.numel() - 2)
    frac = (x - float(s[i])) / float(s[i + 1] - s[i])
    return float(kept[i] + frac * (kept[i + 1] - kept[i]))


def solve(slopes: dict[str, torch.Tensor], kept: dict[str, torch.Tensor], s: torch.Tensor, target: float,
          cap: dict[str, int], iters: int = 200) -> Solution:
    """Equal-slope sparsities whose kept total is ``target`` (within a fraction of one grid step).

    Args:
        slopes: layer -> (G,) dJ/ds on the grid ``s`` (made non-decreasing here).
        kept: layer -> (G,) budget quantity the layer keeps at each grid point (non-increasing).
        target: the kept total to reach; cap: layer -> highest grid index allowed.
    """
    d = {n: monotone(v.double()) for n, v in slopes.items()}
    low = min(float(v[:cap[n] + 1].min()) for n, v in d.items())
    high = max(float(v[:cap[n] + 1].max()) for n, v in d.items())
    tiny = max(high - low, 1e-30) * 1e-12
    shift = low - tiny  # t = shift + tau, tau > 0: log-bisection also covers slopes <= 0

    def at(tau: float) -> tuple[dict[str, int], float]:
        idx = {n: pick(v, shift + tau, cap[n]) for n, v in d.items()}
        return idx, sum(float(kept[n][i]) for n, i in idx.items())

    lo, hi = torch.log(torch.tensor(tiny / 2)).item(), torch.log(torch.tensor(2 * (high - shift))).item()
    idx_lo, kept_lo = at(float(torch.tensor(lo).exp()))  # least pruning
    idx_hi, kept_hi = at(float(torch.tensor(hi).exp()))  # most pruning
    if kept_lo <= target:  # even the least pruning keeps too little: prune least
        idx_hi, kept_hi, hi = idx_lo, kept_lo, lo
    for _ in range(iters if kept_hi < target < kept_lo else 0):
        if hi - lo < 1e-12:
            break
        mid = (lo + hi) / 2
        idx, k = at(float(torch.tensor(mid).exp()))
        if k > target:
            lo, idx_lo, kept_lo = mid, idx, k
        else:
            hi, idx_hi, kept_hi = mid, idx, k
    sparsity = {n: float(s[i]) for n, i in idx_hi.items()}
    if kept_hi < target < kept_lo:  # share the gap among the layers that jump between the two t
        alpha = (kept_lo - target) / (kept_lo - kept_hi)
        sparsity = {n: float(s[idx_lo[n]] + alpha * (s[idx_hi[n]] - s[idx_lo[n]])) for n in d}
    total = sum(kept_at(kept[n], s, x) for n, x in sparsity.items())
    return Solution(float(shift + torch.tensor(hi).exp()), idx_hi, sparsity, total)


def whole_tiles(objective: dict[str, torch.Tensor], kept: dict[str, torch.Tensor], sparsity: dict[str, float],
                target: float, cap: dict[str, int]) -> dict[str, int]:
    """Tiles to remove per layer: ``sparsity`` rounded, then moved one tile at a time toward ``target``.

    Args:
        objective: layer -> (n_tiles + 1,) J with k tiles removed; kept: layer -> (n_tiles + 1,) budget kept.
        cap: layer -> most tiles it may lose.
    Per-tile objective increments are made non-decreasing first (as `solve` does with slopes). While the
    total keeps more than the target, the layer whose next tile costs the least objective per unit of
    budget loses it; then, while giving a tile back brings the total closer to the target, the
    layer whose last tile was dearest gets it back.
    """
    k = {n: min(cap[n], round(sparsity[n] * (objective[n].numel() - 1))) for n in objective}
    total = sum(float(kept[n][k[n]]) for n in k)
    step = {n: monotone(v.double().diff()) for n, v in objective.items()}  # (n_tiles,) as the solver sees slopes

    def rate(n: str, i: int) -> float:  # objective per unit of budget of removing tile i + 1
        gain = float(kept[n][i] - kept[n][i + 1])
        return float(step[n][i]) / max(gain, 1e-30)

    while total > target:
        free = [n for n in k if k[n] < cap[n]]
        if not free:
            break
        n = min(free, key=lambda m: rate(m, k[m]))
        total += float(kept[n][k[n] + 1] - kept[n][k[n]])
        k[n] += 1
    while True:
        back = [n for n in k if k[n] > 0 and abs(total + float(kept[n][k[n] - 1] - kept[n][k[n]]) - target)
                < abs(total - target)]
        if not back:
            break
        n = max(back, key=lambda m: rate(m, k[m] - 1))
        total += float(kept[n][k[n] - 1] - kept[n][k[n]])
        k[n] -= 1
    return k
