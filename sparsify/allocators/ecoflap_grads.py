"""ECoFLaP first-order importance scores (`sparsify.allocators.ecoflap`; zeroth order is `ecoflap_scores`).

Real gradients of the family's loss (`ecoflap_loss`) with respect to the adjustable weights, one backward
pass per calibration row (or unit); a matrix scores the sum over its entries of |G| (or |G * W|), averaged
over the passes (the reference's GradOnly score). Only the adjustable weights take gradients; everything
else is frozen for the pass and restored.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sparsify.allocators.ecoflap_loss import Objective, _rows, units_of
from sparsify.allocators.ecoflap_scores import Group, no_kv_cache, references, schedule
from sparsify.tensors import to_device


def first_order_scores(model: nn.Module, modules: dict[str, nn.Module], objective: Objective, batches: list[dict],
                       samples: int | None = None, weighted: bool = False, rows_per_pass: int = 1,
                       device="cpu", norm: str = "l1", per_pass: bool = False) -> dict[str, float] | dict[str, list[float]]:
    """{matrix: mean over the backward passes of the sum over its entries of |G| (or |G * W|)}.

    ``norm="l2"`` takes the Euclidean norm of G (or G * W) instead of the sum of |.|: per matrix, what
    a zeroth-order estimate measures (up to sqrt(2 / pi)). ``per_pass=True`` returns each pass's value
    instead of their mean (a group's norm is then combined per pass: `group_norms`).

    G is one pass's gradient (``rows_per_pass`` calibration rows, or one unit); the |.| is taken per
    pass before averaging, as ECoFLaP's GradOnly score does per batch, so gradients that change sign
    from sample to sample add up instead of cancelling.
    """
    units = units_of(objective, batches)
    refs = references(model, objective, batches, device)
    units_a_pass = max(1, rows_per_pass // max(1, len(units[0][1]))) if units else 1
    passes = schedule(units, range(len(units) if samples is None else min(samples, len(units))), units_a_pass)
    flags = {p: p.requires_grad for p in model.parameters()}
    params = {n: m.weight for n, m in modules.items()}
    values: dict[str, list[float]] = {n: [] for n in modules}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in params.values():
            p.requires_grad_(True)
        with no_kv_cache(model), torch.enable_grad():
            for p in passes:
                b = p[0][1]
                rows = [r for _, _, unit in p for r in unit]
                batch = to_device(_rows(batches[b], rows), device, clone=True)
                result = objective.forward(model, batch)
                slices, a = [], 0
                for _, _, unit in p:
                    slices.append((a, a + len(unit)))
                    a += len(unit)
                objective.losses(result, batch, refs[b], slices, torch.as_tensor(rows)).sum().backward()
                for name, w in params.items():  # every matrix read before any is cleared (tied weights)
                    if w.grad is None:  # no path from this pass's loss to the matrix
                        values[name].append(0.0)
                        continue
                    g = w.grad * w.detach() if weighted else w.grad  # (out, in)
                    values[name].append(float(g.abs().sum(dtype=torch.float64) if norm == "l1" else g.double().norm()))
                for w in params.values():
                    w.grad = None
        return values if per_pass else {name: sum(v) / max(1, len(v)) for name, v in values.items()}
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)


def group_norms(per_pass: dict[str, list[float]], groups: list[Group]) -> dict[str, float]:
    """{group: mean over the passes of sqrt(sum over its matrices of ||G||_2^2)}: the norm of the whole group's
    gradient, what one zeroth-order draw over the group measures (up to sqrt(2 / pi)), from per-pass matrix norms."""
    out = {}
    for g in groups:
        passes = zip(*(per_pass[n] for n in g.modules))
        norms = [math.sqrt(sum(v * v for v in p)) for p in passes]
        out[g.name] = sum(norms) / max(1, len(norms))
    return out
