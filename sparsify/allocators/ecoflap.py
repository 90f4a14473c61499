"""``--allocation ecoflap``: coarse-to-fine layer-wise pruning (Sung et al., ICLR 2024), the coarse stage.

Groups of adjustable matrices (``group``: each ``matrix``, each transformer ``block`` (default), or each
``tower`` of a multimodal model, i.e. each list of repeated blocks) get an importance score from the
family's own loss (`ecoflap_loss`): ``first`` order (default; real gradients, |G| summed over a
matrix's entries and averaged over the passes, or |G * W| with ``weighted``, or ||G||_2 with
``norm=l2``) or ``zeroth`` order
(two-sided random perturbations, forward passes only; `ecoflap_scores`). A group's score is the sum
of its matrices' scores (a zeroth-order estimate is per group already); with ``norm=group`` it is
the mean over the passes of the Euclidean norm of the whole group's gradient, the quantity a
zeroth-order draw measures; ``aggregation=mean`` divides it by the group's weight count.

`capped_fill` turns scores into per-group keep counts: the total keep K = (1 - S) N is fixed (S the
plan's parameter-weighted sparsity over the adjustable layers); every group first keeps
ceil(n_g (1 - S_max)); the rest of the budget goes to the groups not yet full in proportion to their
scores, capped at n_g, redistributing what the capped ones could not take, until it is spent; then
integer rounding by largest remainders, so the keep counts sum to K exactly. ``per_tower`` runs the
fill inside each tower with its own budget. Every matrix of a group gets the group's sparsity
1 - keep_g / n_g, and the local method (``--method``) prunes with it.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from sparsify import progress
from sparsify.allocators.base import AllocationContext, Allocator
from sparsify.allocators.ecoflap_loss import objective_for
from sparsify.allocators.ecoflap_grads import first_order_scores, group_norms
from sparsify.allocators.ecoflap_scores import Group, ZerothOrder, zeroth_order_scores
from sparsify.allocators.ecoflap_stop import Pool
from sparsify.errors import UserError
from sparsify.models.layout import block_index
from sparsify.tables import ALLOCATORS

GROUPS = ("matrix", "block", "tower")


@dataclass
class ECoFLaPConfig:
    max_sparsity: float | None = None  # per-group cap S_max (default: the target + 0.1, at most 0.99)
    group: str = "block"  # matrix | block | tower
    score: str = "first"  # first (gradients) | zeroth (perturbations, forward passes only)
    aggregation: str = "sum"  # sum of the matrices' scores in a group | mean: that sum per weight
    score_samples: int | None = None  # calibration units scored (zeroth: most draws per group); None: all
    weighted: bool = False  # first order: |G * W| instead of |G|
    norm: str = "l1"  # first order: l1 sums |G| over a matrix's entries; l2 takes ||G||_2; group: ||G||_2 of the whole group
    per_tower: bool = False  # allocate inside each tower with its own budget
    eps: float = 1e-3  # zeroth order: perturbation size
    rtol: float = 0.2  # zeroth order: draws for a relative standard error of about rtol (`ecoflap_stop`; 0: all)
    min_samples: int = 8  # zeroth order: the fewest draws of a group, and the first group's pilot
    units_per_pass: int = 1  # zeroth order: units (each with its own direction) per batched +-eps pass
    rows_per_pass: int = 1  # first order: calibration rows per backward pass (|G| is taken per pass)
    seed: int = 0
    scores_file: str | None = None  # JSON of group scores: read when it exists (same groups), else written

    def __post_init__(self):
        for key, value, allowed in (("group", self.group, GROUPS), ("score", self.score, ("first", "zeroth")),
                                    ("aggregation", self.aggregation, ("sum", "mean")), ("norm", self.norm, ("l1", "l2", "group"))):
            if value not in allowed:
                raise UserError(f"ecoflap {key}={value!r}: choose one of {', '.join(allowed)}")
        if self.max_sparsity is not None and not 0 <= self.max_sparsity < 1:
            raise UserError(f"ecoflap max_sparsity={self.max_sparsity}: must be in [0, 1)")
        if self.eps <= 0 or self.rtol < 0 or min(self.min_samples, self.units_per_pass, self.rows_per_pass) < 1:
            raise UserError("ecoflap: eps must be > 0, rtol >= 0, min_samples / units_per_pass / rows_per_pass >= 1")
        if self.score_samples is not None and self.score_samples < 1:
            raise UserError(f"ecoflap score_samples={self.score_samples}: must be >= 1")


def capped_fill(numel: dict[str, int], scores: dict[str, float], keep_total: int, max_sparsity: float) -> dict[str, int]:
    """Keep counts per group: each >= ceil(n_g (1 - max_sparsity)) and <= n_g, summing to ``keep_total``.

    Above the floor, the budget is shared in proportion to the (non-negative) scores of the groups not
    yet full; a group that would pass n_g is capped and the rest shared again (zero scores everywhere:
    in proportion to the room left).
    """
    names = list(numel)
    n = {g: int(numel[g]) for g in names}
    if not 0 <= keep_total <= sum(n.values()):
        raise ValueError(f"keep_total {keep_total} outside [0, {sum(n.values())}]")
    floor = {g: min(n[g], math.ceil(n[g] * (1 - max_sparsity) - 1e-9)) for g in names}
    if sum(floor.values()) > keep_total:  # S_max == S: ceil can overshoot by < one per group
        floor = {g: math.floor(n[g] * (1 - max_sparsity) + 1e-9) for g in names}
        if sum(floor.values()) > keep_total:
            raise ValueError("max_sparsity is below the target sparsity")
    keep = {g: float(floor[g]) for g in names}
    left = float(keep_total - sum(floor.values()))
    free = [g for g in names if keep[g] < n[g]]
    while left > 1e-9 and free:
        weight = {g: max(0.0, float(scores[g])) for g in free}
        if sum(weight.values()) <= 0:
            weight = {g: n[g] - keep[g] for g in free}
        total = sum(weight.values())
        share = {g: left * weight[g] / total for g in free}
        capped = [g for g in free if keep[g] + share[g] >= n[g]]
        if not capped:
            for g in free:
                keep[g] += share[g]
            break
        for g in capped:
            left -= n[g] - keep[g]
            keep[g] = float(n[g])
        free = [g for g in free if g not in capped]
    out = {g: min(n[g], int(math.floor(keep[g] + 1e-9))) for g in names}
    short = keep_total - sum(out.values())
    order = sorted((g for g in names if out[g] < n[g]), key=lambda g: (out[g] - keep[g], names.index(g)))
    for g in order[:short]:
        out[g] += 1
    assert sum(out.values()) == keep_total
    return out


def scores_key(config: ECoFLaPConfig) -> dict:
    """What a saved score file must match to be reused (everything that changes the scores)."""
    keys = ("group", "score", "aggregation", "score_samples", "weighted", "norm", "rows_per_pass", "eps", "rtol", "min_samples", "seed")
    return {k: getattr(config, k) for k in keys}


def read_scores(config: ECoFLaPConfig, groups: list[Group]) -> dict[str, float] | None:
    """Group scores from ``config.scores_file`` when it exists; a file for other groups or options is an error."""
    if not config.scores_file or not Path(config.scores_file).is_file():
        return None
    try:
        data = json.loads(Path(config.scores_file).read_text())
        scores, key = {str(k): float(v) for k, v in data["scores"].items()}, data["key"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"ecoflap scores_file={config.scores_file}: not a scores file written by sparsify: "
                        "delete it or choose another path") from None
    if key != scores_key(config) or set(scores) != {g.name for g in groups}:
        raise UserError(f"ecoflap scores_file={config.scores_file} was written for other groups or options: "
                        "delete it or choose another path")
    return scores


def make_groups(ctx: AllocationContext, adjustable: dict[str, str], group: str) -> list[Group]:
    prefixes = [p for p, _ in ctx.blocks]
    modules = {n: m for mods in ctx.targets.values() for n, m in mods.items()}
    groups: dict[str, Group] = {}
    for name in adjustable:
        tower, index = block_index(name, prefixes)
        key = {"matrix": name, "block": f"{tower}.{index}", "tower": tower}[group]
        g = groups.setdefault(key, Group(key, {}, tower, index))
        g.modules[name] = modules[name]
        g.start = min(g.start, index)
    return list(groups.values())


def allocate(ctx: AllocationContext, config: ECoFLaPConfig):
    adjustable = ctx.adjustable()
    if not adjustable:
        return dict(ctx.plans), {"note": "no unstructured layer to allocate"}
    objective = objective_for(ctx.family)
    groups = make_groups(ctx, adjustable, config.group)
    numel = {g.name: sum(ctx.numel[n] for n in g.modules) for g in groups}
    dense = {n: ctx.numel[n] for n in adjustable}
    target = sum(ctx.plans[n].sparsity * dense[n] for n in adjustable) / sum(dense.values())
    s_max = min(0.99, target + 0.1) if config.max_sparsity is None else config.max_sparsity
    if s_max < target - 1e-9:
        raise UserError(f"ecoflap max_sparsity={s_max} is below the target sparsity {target:.4f}: raise it")
    batches = ctx.batches()
    if not batches:
        raise UserError("--allocation ecoflap needs calibration data: drop --calib none or choose another allocation")
    t0 = time.perf_counter()
    samples: dict[str, int] = {}
    drawn: dict = {}
    saved = read_scores(config, groups)
    if saved is not None:
        scores = saved
    elif config.score == "first":
        with progress.bar("ECoFLaP gradients", total=1) as advance:
            per_pass = first_order_scores(ctx.model, {n: m for g in groups for n, m in g.modules.items()}, objective,
                                          batches, config.score_samples, config.weighted, config.rows_per_pass,
                                          ctx.device, "l2" if config.norm == "group" else config.norm, per_pass=True)
            advance()
        if config.norm == "group":
            scores = group_norms(per_pass, groups)
        else:
            scores = {g.name: sum(sum(per_pass[n]) / max(1, len(per_pass[n])) for n in g.modules) for g in groups}
    else:
        settings = ZerothOrder(config.eps, config.score_samples, config.min_samples, config.rtol,
                               config.units_per_pass, config.seed)
        pool = Pool()
        with progress.bar("ECoFLaP perturbations", total=len(groups)) as advance:
            values = zeroth_order_scores(ctx.model, ctx.blocks, groups, objective, batches, settings, ctx.device, advance,
                                         pool)
        scores = {g: sum(v) / max(1, len(v)) for g, v in values.items()}
        samples = {g: len(v) for g, v in values.items()}
        drawn = {"pilot_draws": len(pool.pilot), "pooled_cv": pool.cv}
    if config.aggregation == "mean" and saved is None:
        scores = {g.name: scores[g.name] / numel[g.name] for g in groups}
    score_s = time.perf_counter() - t0
    if config.scores_file and saved is None:
        Path(config.scores_file).write_text(json.dumps({"key": scores_key(config), "scores": scores}, indent=1))
    parts = {}
    for g in groups:
        parts.setdefault(g.tower if config.per_tower else "", []).append(g)
    keep: dict[str, int] = {}
    for members in parts.values():
        names = [n for g in members for n in g.modules]
        budget = round(sum((1 - ctx.plans[n].sparsity) * dense[n] for n in names))
        keep.update(capped_fill({g.name: numel[g.name] for g in members}, {g.name: scores[g.name] for g in members},
                                budget, s_max))
    sparsity = {g: 1 - keep[g] / numel[g] for g in keep}
    plans = dict(ctx.plans)
    for g in groups:
        for name in g.modules:
            plans[name] = plans[name].with_sparsity(sparsity[g.name])
    info = {"target": target, "max_sparsity": s_max, "score_kind": config.score, "group": config.group,
            "loss": type(objective).__name__, "score_s": round(score_s, 2),
            **({"scores_from": config.scores_file} if saved is not None else {}), **drawn,
            "groups": {g.name: {"score": scores[g.name], "sparsity": sparsity[g.name], "keep": keep[g.name],
                                "numel": numel[g.name], "matrices": len(g.modules),
                                **({"samples": samples[g.name]} if samples else {})} for g in groups}}
    return plans, info


ALLOCATORS["ecoflap"] = Allocator("ecoflap", ECoFLaPConfig, allocate,
                                  "ECoFLaP: per block/matrix/tower from loss gradients or perturbations, capped fill")
