"""ECoFLaP zeroth-order importance scores per group of matrices (`sparsify.allocators.ecoflap`); first order
is `ecoflap_grads`.

For one group and one calibration unit u, draw a Gaussian direction z over all of the
group's weights (one independent draw per (group, sample), seeded by both), and add
|L_u(W + eps z) - L_u(W - eps z)| / (2 eps) ~ |g_u . z| to the group's estimate; its expectation is
sqrt(2 / pi) ||g_u||, the gradient norm of the group. The score is the mean over the samples drawn.
`zeroth_order_scores` computes exactly that estimate, cheaper than the reference loop
(`naive_zeroth_order_scores`: perturb the weights in place, run the whole model twice per unit):
  - cached block inputs: the inputs of the group's first block are computed once per tower, block by
    block (`calibrate.capture` + `runner.forward_block`); blocks before it are skipped (their forward
    returns the cached input of the group's block), so a pass costs only the blocks from there on,
    plus the model's embeddings and head;
  - +eps and -eps in one batched pass: the rows of a unit appear twice in one forward, and each of the
    group's matrices computes x (W + eps z)^T for the first copy and x (W - eps z)^T for the second
    (`perturbed`), several units per pass, each with its own z;
  - early stop: each group's draw count is fixed before its first draw, from the spread of the groups
    scored before it (`ecoflap_stop`: unbiased, unlike stopping on a group's own draws); both
    implementations use the same rule.
For the same seed both implementations draw the same directions for the same units, so their estimates
agree to floating-point rounding (tests/unit/test_ecoflap.py checks it in float64).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sparsify.allocators.ecoflap_loss import Objective, _rows, unit_loss, units_of
from sparsify.allocators.ecoflap_stop import Pool, planned_draws
from sparsify.calibrate.capture import Call, capture, patched_forwards, with_hidden
from sparsify.calibrate.runner import forward_block
from sparsify.models.targets import layout_of, weight_of
from sparsify.tensors import to_device


@dataclass
class Group:
    """Matrices whose sparsity is allocated together. ``start``: index (in ``tower``) of the first block holding one."""

    name: str
    modules: dict[str, nn.Module]
    tower: str
    start: int


@dataclass
class ZerothOrder:
    eps: float = 1e-3
    samples: int | None = None  # most units drawn per group (None: one per calibration unit)
    min_samples: int = 8  # the fewest draws of a group, and the first group's pilot (`ecoflap_stop`)
    rtol: float = 0.2  # draw until the relative standard error is about rtol (`ecoflap_stop`); 0: every draw
    units_per_pass: int = 1  # 1: one unit's +eps and -eps copies per pass (more rows per pass ran slower per row on CPU)
    seed: int = 0


@contextmanager
def no_kv_cache(model: nn.Module):
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if use_cache is not None:
            config.use_cache = use_cache


def direction(seed: int, group: int, sample: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """The Gaussian direction (one float32 tensor per matrix, (out, in)) of a (group, sample) pair."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + group) * 1_000_003 + sample) % (2 ** 63))
    return [torch.randn(s, generator=g) for s in shapes]


def schedule(units: list, samples: range, per_pass: int) -> list[list[tuple[int, int, list[int]]]]:
    """Passes of at most ``per_pass`` (sample index, batch, rows), a pass never mixing batches; units cycle."""
    passes, current = [], []
    for s in samples:
        b, rows = units[s % len(units)]
        if current and (len(current) == per_pass or current[-1][1] != b):
            passes.append(current)
            current = []
        current.append((s, b, rows))
    return passes + ([current] if current else [])


def references(model, objective: Objective, batches: list[dict], device) -> list:
    if not objective.needs_reference:
        return [None] * len(batches)
    with torch.no_grad():  # ordinary tensors: first-order losses keep them for backward
        return [objective.reference(model, to_device(b, device)) for b in batches]


def in_scoring_order(groups: list[Group]) -> list[Group]:
    """Towers in order of first appearance, blocks in order inside each: the order both estimators draw in
    (it decides which groups' spread fixes each group's draw count, `ecoflap_stop`)."""
    towers = list(dict.fromkeys(g.tower for g in groups))
    return sorted(groups, key=lambda g: (towers.index(g.tower), g.start))


@contextmanager
def start_at(layers: nn.ModuleList, k: int, holder: dict):
    """Blocks ``0..k-1`` of ``layers`` skipped: block 0 returns ``holder["hidden"]`` (block k's input)."""
    if k == 0:
        yield
        return
    template: dict = {}
    real_first = layers[0].forward

    def first(*args, **kwargs):
        if "out" not in template:
            out = real_first(*args, **kwargs)
            reusable = not isinstance(out, (tuple, list)) or all(not torch.is_tensor(t) for t in out[1:])
            if not reusable:
                return with_hidden(out, holder["hidden"])
            template["out"] = out
        return with_hidden(template["out"], holder["hidden"])

    def passthrough(*args, **kwargs):
        x, _ = Call.split(args, kwargs)
        return with_hidden(template["out"], x) if "out" in template else x

    with patched_forwards([layers[j] for j in range(k)], [first] + [passthrough] * (k - 1)):
        yield


@contextmanager
def perturbed(modules: list[nn.Module], dirs: list[list[torch.Tensor]], rows: int, eps: float):
    """Each module runs unit j's first copy of rows with weight W + eps z and its second with W - eps z.

    One matmul per copy, with the same arithmetic as the naive loop's in-place W + eps z (a hook adding
    eps x z^T to the dense output would cost a second matmul); the parameter's storage is never written:
    ``.data`` points at the perturbed weight for the call and at the original after it.
    """
    def make(i: int, m: nn.Module):
        real, param = m.forward, m.weight
        conv1d = layout_of(m) == "conv1d"

        def forward(x, *args, **kwargs):
            original, outs = param.data, []
            w = original.T if conv1d else original  # (out, in)
            try:
                for j, zs in enumerate(dirs):
                    z = zs[i].to(device=w.device, dtype=w.dtype)  # (out, in)
                    for sign, a in ((1.0, 2 * j * rows), (-1.0, (2 * j + 1) * rows)):
                        moved = w + (sign * eps) * z
                        param.data = moved.T.contiguous() if conv1d else moved
                        outs.append(real(x[a:a + rows], *args, **kwargs))
            finally:
                param.data = original
            return torch.cat(outs)
        return forward
    with patched_forwards(modules, [make(i, m) for i, m in enumerate(modules)]):
        yield


def zeroth_order_scores(model: nn.Module, blocks: list, groups: list[Group], objective: Objective,
                        batches: list[dict], settings: ZerothOrder, device="cpu", progress=None,
                        pool: Pool | None = None) -> dict[str, list[float]]:
    """{group: the |L+ - L-| / (2 eps) values drawn}, with cached block inputs and batched +-eps passes.

    ``pool`` (filled here) ends with the spread of every draw and the first group's pilot draws (`ecoflap_stop`).
    """
    units = units_of(objective, batches)
    refs = references(model, objective, batches, device)
    most = len(units) if settings.samples is None else settings.samples
    pool = Pool() if pool is None else pool
    values: dict[str, list[float]] = {}
    index = {g.name: i for i, g in enumerate(groups)}
    towers, order = dict(blocks), in_scoring_order(groups)
    with no_kv_cache(model), torch.inference_mode():
        for prefix in dict.fromkeys(g.tower for g in order):
            layers = towers[prefix]
            mine = [g for g in order if g.tower == prefix]
            hidden, calls = capture(model, layers, batches, device, "cpu")
            k = 0
            for g in mine:
                while k < g.start:
                    hidden = forward_block(layers[k], f"{prefix}.{k}", hidden, calls[k], device, "cpu", keep=True)
                    k += 1

                def draw(samples: range, g=g) -> list[float]:
                    return _sample_group(model, layers, g, index[g.name], hidden, objective, batches, refs,
                                         schedule(units, samples, settings.units_per_pass), settings, device)
                values[g.name] = planned_draws(draw, pool, settings.rtol, settings.min_samples, most)
                if progress:
                    progress()
    return {g.name: values[g.name] for g in groups}


def _sample_group(model, layers, g: Group, gi: int, hidden, objective, batches, refs, passes, settings,
                  device) -> list[float]:
    modules = list(g.modules.values())
    shapes = [tuple(weight_of(m).shape) for m in modules]
    holder: dict = {}
    out: list[float] = []
    with start_at(layers, g.start, holder):
        for p in passes:
            b, rows = p[0][1], len(p[0][2])
            pass_rows = [r for _, _, unit in p for r in unit + unit]
            batch = to_device(_rows(batches[b], pass_rows), device)
            if g.start:
                holder["hidden"] = hidden[b][torch.as_tensor(pass_rows)].to(device)
            dirs = [direction(settings.seed, gi, s, shapes) for s, _, _ in p]
            with perturbed(modules, dirs, rows, settings.eps):
                result = objective.forward(model, batch)
            slices = [(a, a + rows) for a in range(0, len(pass_rows), rows)]
            losses = objective.losses(result, batch, refs[b], slices, torch.as_tensor(pass_rows)).double().cpu()
            out += [abs(float(losses[2 * j] - losses[2 * j + 1])) / (2 * settings.eps) for j in range(len(p))]
    return out


def naive_zeroth_order_scores(model: nn.Module, groups: list[Group], objective: Objective, batches: list[dict],
                              settings: ZerothOrder, device="cpu") -> dict[str, list[float]]:
    """The reference loop: per group and unit, W += eps z in place, run the whole model, W -= 2 eps z, run, restore."""
    units = units_of(objective, batches)
    refs = references(model, objective, batches, device)
    most = len(units) if settings.samples is None else settings.samples
    pool = Pool()
    values: dict[str, list[float]] = {}
    index = {g.name: i for i, g in enumerate(groups)}
    with no_kv_cache(model), torch.inference_mode():
        for g in in_scoring_order(groups):
            gi = index[g.name]
            weights = [weight_of(m) for m in g.modules.values()]
            saved = [w.clone() for w in weights]
            shapes = [tuple(w.shape) for w in weights]

            def draw(samples: range, gi=gi, weights=weights, saved=saved, shapes=shapes) -> list[float]:
                out = []
                for s in samples:
                    b, rows = units[s % len(units)]
                    dirs = direction(settings.seed, gi, s, shapes)
                    loss = {}
                    for sign in (1.0, -1.0):
                        for w, w0, z in zip(weights, saved, dirs):
                            w.copy_(w0 + (sign * settings.eps) * z.to(device=w0.device, dtype=w0.dtype))
                        loss[sign] = float(unit_loss(model, objective, batches[b], refs[b], rows, device))
                    out.append(abs(loss[1.0] - loss[-1.0]) / (2 * settings.eps))
                return out
            try:
                values[g.name] = planned_draws(draw, pool, settings.rtol, settings.min_samples, most)
            finally:
                for w, w0 in zip(weights, saved):
                    w.copy_(w0)
    return {g.name: values[g.name] for g in groups}
