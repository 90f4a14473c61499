"""``--allocation owl``: Outlier Weighed Layerwise sparsity (Yin et al. 2024).

Per block, the outlier ratio D_l is the share of Wanda scores |W_ij| * ||X_:,j|| (over all the
block's adjustable matrices together) above ``m`` times their mean. Blocks with more outliers are
pruned less:

    s_l = S - lambda * (2 * (D_l - min D) / (max D - min D) - 1)

then shifted so that the parameter-weighted mean over the blocks is exactly the target S (the
plan's own parameter-weighted sparsity of the adjustable layers), and kept inside [0, max_sparsity].
Scores come from one dense calibration pass (block inputs from the unpruned model, as the OWL code
does), then the local pruner runs with the per-block sparsities. Options: ``m`` (5), ``lam`` (0.08).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsify.allocators.base import AllocationContext, Allocator
from sparsify.models.targets import weight_of
from sparsify.tables import ALLOCATORS


@dataclass
class OWLConfig:
    m: float = 5.0  # outlier threshold, in multiples of the block's mean score
    lam: float = 0.08  # half-width of the sparsity range around the target
    max_sparsity: float = 0.99  # no block beyond this


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of all entries of ``scores`` above ``m`` times their common mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])  # (numel,)
    return float((flat > m * flat.mean()).float().mean())


def spread(ratios: dict[str, float], numel: dict[str, int], target: float, lam: float,
           max_sparsity: float = 0.99) -> dict[str, float]:
    """Per-group sparsities from outlier ratios; parameter-weighted mean exactly ``target``.

    Clipping to [0, max_sparsity] can move the mean; the shift is then repeated over the groups that
    are not clipped (a few rounds at most).
    """
    names = list(ratios)
    d = torch.tensor([ratios[n] for n in names], dtype=torch.float64)
    w = torch.tensor([numel[n] for n in names], dtype=torch.float64)
    span = float(d.max() - d.min())
    s = torch.full_like(d, target) if span == 0 else target - lam * (2 * (d - d.min()) / span - 1)
    free = torch.ones_like(d, dtype=torch.bool)
    for _ in range(len(names) + 1):
        gap = target * w.sum() - (s * w).sum()
        if abs(float(gap)) < 1e-12 or not free.any():
            break
        s = torch.where(free, s + gap / w[free].sum(), s)
        clipped = (s < 0) | (s > max_sparsity)
        s = s.clamp(0, max_sparsity)
        free &= ~clipped
    return {n: float(v) for n, v in zip(names, s)}


def allocate(ctx: AllocationContext, config: OWLConfig):
    """Outlier ratios per block from a dense Wanda-statistics pass, then `spread` around the plan's sparsity."""
    adjustable = ctx.adjustable()
    if not adjustable:
        return dict(ctx.plans), {"note": "no unstructured layer to allocate"}
    ratios: dict[str, float] = {}

    def on_block(block_targets, stats, _observed):
        names = [n for n in block_targets if n in adjustable]
        if names:
            scores = [weight_of(block_targets[n]).float().abs() * stats[n].norms()[None, :] for n in names]  # (out, in)
            ratios[adjustable[names[0]]] = outlier_ratio(scores, config.m)

    kinds = {n: ("colnorm" if n in adjustable else None) for mods in ctx.targets.values() for n in mods}
    ctx.dense_pass(kinds, on_block, label="OWL scores")
    block_numel: dict[str, int] = {}
    for name, block in adjustable.items():
        block_numel[block] = block_numel.get(block, 0) + ctx.numel[name]
    target = sum(ctx.plans[n].sparsity * ctx.numel[n] for n in adjustable) / sum(block_numel.values())
    sparsity = spread(ratios, block_numel, target, config.lam, config.max_sparsity)
    plans = dict(ctx.plans)
    for name, block in adjustable.items():
        plans[name] = plans[name].with_sparsity(sparsity[block])
    info = {"target": target, "groups": {b: {"score": ratios[b], "sparsity": sparsity[b]} for b in ratios}}
    return plans, info


ALLOCATORS["owl"] = Allocator("owl", OWLConfig, allocate, "outlier-weighed layer-wise sparsity (per block)")
