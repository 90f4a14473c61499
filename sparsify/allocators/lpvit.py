"""``--allocation lpvit``: hardware-aware block sparsity per layer (LPViT, Xu et al., ECCV 2024).

For every layer with a block scheme (``--scheme block:RxC``):
1. Gradient signal g = mean over the calibration images of the gradient of the output energy
   mean(f(x)^2) (logits; embeddings for encoders), or of the cross-entropy when a batch has
   ``labels``. One forward + backward per batch over the whole model.
2. Block score mean |W * g| per tile; distortion D(s) on the grid s = 0, step, ..., 1 in closed form
   (`lpvit_curves`), optionally smoothed; cost P(s) of the surviving blocks (``cost=flops``: weights
   x tokens, ``cost=blocks``: tiles). J = D + beta * P with beta = ``beta`` x (mean over layers of
   max D') / (mean of max |P'|), so both terms have comparable slopes. P falls with s: a larger beta
   prunes the layers whose blocks cost more harder.
3. Equal slopes (`lpvit_solver`): every layer takes the s where dJ/ds is closest to a common t
   (capped at ``max_sparsity``, and at least one tile kept); bisection on log t meets the budget:
   ``flops_kept=F`` (the fraction of the block layers' dense FLOPs, surviving weights x tokens, to
   keep), else the plan's parameter-weighted sparsity over those layers. Sparsities are then rounded
   to whole tiles per layer, the total moved to the target one tile at a time (within one tile).
   ``slope=budget`` equalises dJ per unit of budget removed instead of dJ/ds (see docs/lpvit.md).
The local pruner (``--method``) then picks which tiles go, by its own tile score (magnitude |W|,
Wanda |W| ||x||): LPViT decides how many per layer. Layers with other schemes keep their plan.
``cost=measured`` (with ``costs=FILE``): P is the latency of the layer's surviving tiles, read from
timings that ``sparsify bench ARTIFACT --save-costs FILE`` took on the target device (`eval.costs`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsify.allocators import lpvit_curves as curves
from sparsify.allocators.base import AllocationContext, Allocator
from sparsify.allocators.lpvit_solver import solve, whole_tiles
from sparsify.errors import UserError
from sparsify.models.targets import layout_of, weight_of
from sparsify.tables import ALLOCATORS
from sparsify.tensors import to_device


@dataclass
class LPViTConfig:
    flops_kept: float | None = None  # fraction of the block layers' dense FLOPs to keep; None: the plan's sparsity
    cost: str = "flops"  # hardware cost of the surviving blocks: flops | blocks | measured (needs costs)
    costs: str | None = None  # cost=measured: the latency file of `sparsify bench --save-costs`
    beta: float = 1.0  # weight of the cost term, in units of the automatic balance (0: distortion only)
    step: float = 0.01  # sparsity grid step of the curves
    smooth: int = 0  # moving-average half-width (grid points) over each distortion curve; 0: none
    lam: float = curves.LAMBDA  # weight of the ||dW||^2 term
    max_sparsity: float = 0.95  # no layer beyond this (and every layer keeps at least one tile)
    slope: str = "sparsity"  # equal dJ/ds per layer (the paper), or "budget": equal dJ per unit of budget removed

    def __post_init__(self):
        if self.cost not in (*curves.COST_MODELS, "measured"):
            raise UserError(f"lpvit cost={self.cost!r}: choose one of {', '.join(curves.COST_MODELS)}, measured")
        if (self.cost == "measured") != (self.costs is not None):
            raise UserError("lpvit: cost=measured reads its timings from costs=FILE (write it with sparsify bench "
                            "ARTIFACT --save-costs FILE); costs= goes with cost=measured only")
        if self.slope not in ("sparsity", "budget"):
            raise UserError(f"lpvit slope={self.slope!r}: choose sparsity or budget")
        if self.flops_kept is not None and not 0 < self.flops_kept <= 1:
            raise UserError(f"lpvit flops_kept={self.flops_kept}: pass the fraction of FLOPs to keep, in (0, 1]")
        if not 0 < self.step <= 0.5 or abs(1 / self.step - round(1 / self.step)) > 1e-9:
            raise UserError(f"lpvit step={self.step}: pass 1/n for a whole n, e.g. 0.01")
        if not 0 < self.max_sparsity < 1 or self.beta < 0 or self.smooth < 0 or self.lam < 0:
            raise UserError("lpvit: max_sparsity must be in (0, 1), and beta, smooth, lam >= 0")


def _energy(out) -> torch.Tensor:
    """mean(f(x)^2) of a model output: its logits, else its embeddings, else its last hidden states."""
    for keys in (("logits",), ("image_embeds", "text_embeds"), ("last_hidden_state",)):
        found = [getattr(out, k, None) for k in keys]
        found = [f for f in found if f is not None]
        if found:
            return torch.stack([f.float().pow(2).mean() for f in found]).mean()
    raise UserError("--allocation lpvit: the model output has no logits, embeddings or hidden states to score")


def gradient_signal(model, modules: dict, batches: list[dict], device: str = "cpu"):
    """g per module (out, in), the mean over samples of d loss / d W, and the tokens each module sees per sample.

    The loss is the cross-entropy on ``labels`` when a batch carries them, else the output energy.
    Only the target weights take gradients; ``requires_grad`` flags are restored afterwards.
    """
    params = {n: m.weight for n, m in modules.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    grads = {n: torch.zeros(weight_of(m).shape, dtype=torch.float64) for n, m in modules.items()}  # (out, in)
    tokens = dict.fromkeys(modules, 0)
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: tokens.__setitem__(
        n, tokens[n] + inp[0].numel() // inp[0].shape[-1])) for n, m in modules.items()]
    samples = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                batch = to_device(batch, device, clone=True)
                labels = batch.pop("labels", None)
                n = next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim())
                out = model(**batch)
                loss = F.cross_entropy(out.logits.float(), labels) if labels is not None else _energy(out)
                for (name, p), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
                    g = g.T if layout_of(modules[name]) == "conv1d" else g  # (out, in)
                    grads[name] += g.double().cpu() * n
                samples += n
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    samples = max(samples, 1)
    return {n: g / samples for n, g in grads.items()}, {n: t / samples for n, t in tokens.items()}


def sparsity_of(removed: int, tiles: int) -> float:
    """A plan sparsity s with int(tiles * s) == removed exactly (6-digit plan rounding included)."""
    return min(0.999999, math.ceil((removed + 1e-3) / tiles * 1e6) / 1e6) if removed else 0.0


def allocate_curves(tile: dict[str, curves.TileCurve], tokens: dict[str, float], plan_sparsity: dict[str, float],
                    config: LPViTConfig, latency: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, int], dict]:
    """Tiles to remove per layer from its `TileCurve` (the solver without the model); returns (removed, info).

    ``tokens``: tokens each layer sees per sample (FLOPs = weights x tokens); ``plan_sparsity``: the
    plan's sparsity per layer (the budget when ``config.flops_kept`` is None); ``latency``: with
    ``cost=measured``, each layer's (tiles + 1,) cost of its surviving tiles by tiles removed.
    """
    s = curves.grid(config.step)  # (G,)
    flops = config.flops_kept is not None
    kept, p_tiles, d_slope, p_slope, cap_tiles = {}, {}, {}, {}, {}
    for n, c in tile.items():
        kept[n] = (c.numel - c.removed) * (tokens[n] if flops else 1.0)  # (tiles + 1,) budget kept
        whole = torch.arange(c.tiles + 1, dtype=torch.float64) / c.tiles  # each whole-tile sparsity
        p_tiles[n] = latency[n] if config.cost == "measured" else curves.cost_curve(c, config.cost, tokens[n], whole)
        d_grid = curves.smooth(curves.at_grid(c.distortion(), s), config.smooth)  # (G,)
        per = float(kept[n][0]) if config.slope == "budget" else 1.0  # dJ per unit of budget, or of s
        d_slope[n] = curves.slope(d_grid, s) / per  # (G,)
        p_slope[n] = curves.slope(curves.at_grid(p_tiles[n], s), s) / per  # (G,) <= 0
        cap_tiles[n] = min(c.tiles - 1, int(c.tiles * config.max_sparsity))
    scale = torch.stack([v.max() for v in d_slope.values()]).mean() / \
        torch.stack([v.abs().max() for v in p_slope.values()]).mean().clamp_min(1e-300)
    beta = float(config.beta * scale)
    objective = {n: c.distortion() + beta * p_tiles[n] for n, c in tile.items()}  # (tiles + 1,)
    slopes = {n: d_slope[n] + beta * p_slope[n] for n in tile}  # (G,)
    dense = sum(float(kept[n][0]) for n in tile)
    if flops:
        target = config.flops_kept * dense
    else:
        target = dense - sum(plan_sparsity[n] * tile[n].numel for n in tile)
    cap_index = {n: int(cap_tiles[n] / tile[n].tiles / config.step + 1e-9) for n in tile}
    sol = solve(slopes, {n: curves.at_grid(kept[n], s) for n in tile}, s, target, cap_index)
    removed = whole_tiles(objective, kept, sol.sparsity, target, cap_tiles)
    achieved = sum(float(kept[n][removed[n]]) for n in tile)
    info = {"budget": "flops" if flops else "params", "target": 1 - target / dense, "achieved": 1 - achieved / dense,
            "beta": beta, "t": sol.t,
            "groups": {n: {"sparsity": removed[n] / c.tiles, "tiles": c.tiles, "removed": removed[n],
                           "distortion": float(c.distortion()[removed[n]]), "tokens": tokens[n]}
                       for n, c in tile.items()}}
    return removed, info


def allocate(ctx: AllocationContext, config: LPViTConfig):
    """Gradient signal over the calibration batches, curves per block layer, then `allocate_curves`."""
    adjustable = ctx.adjustable()
    names = [n for n in adjustable if ctx.plans[n].parsed_scheme.kind == "block"]
    if not names:
        raise UserError("--allocation lpvit sets block sparsity per layer: pass --scheme block:16x16 "
                        "(or a plan rule with a block scheme)")
    modules = {n: ctx.targets[adjustable[n]][n] for n in names}
    grads, tokens = gradient_signal(ctx.model, modules, ctx.batches(), ctx.device)
    tile = {n: curves.tile_curve(weight_of(m).float(), grads[n], ctx.plans[n].parsed_scheme.block, config.lam)
            for n, m in modules.items()}
    latency = None
    if config.cost == "measured":
        from sparsify.eval import costs

        table = costs.load(config.costs)
        latency = {n: costs.latency_curve(table, list(weight_of(m).shape), ctx.plans[n].parsed_scheme.block,
                                          tile[n].tiles) for n, m in modules.items()}
    removed, info = allocate_curves(tile, tokens, {n: ctx.plans[n].sparsity for n in names}, config, latency)
    plans = dict(ctx.plans)
    for n in names:
        plans[n] = plans[n].with_sparsity(sparsity_of(removed[n], tile[n].tiles))
    return plans, info


ALLOCATORS["lpvit"] = Allocator("lpvit", LPViTConfig, allocate,
                                "block sparsity per layer by equal distortion slopes plus a hardware cost (LPViT)")
