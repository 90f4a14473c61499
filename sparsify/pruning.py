"""Prune (and quantize) a loaded model in place, layer by layer, each layer by its own plan.

Each layer's method names the statistic it needs (`Pruner.stats`); the runner accumulates exactly
those, shared between layers that read the same input and need the same statistic. After a layer
is pruned, SparseGPT's damping and any identity fallback are recorded (and become warnings).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from sparsify import registry
from sparsify.calibrate import runner
from sparsify.models.targets import set_weight, weight_of
from sparsify.plan import LayerPlan
from sparsify.planning import Planned, method_config


@dataclass
class LayerStep:
    """One layer's pruner, method config and quantization; ``__call__(weight, stats)`` -> (new, qparams)."""

    plan: LayerPlan
    joint_quant: bool = True
    quantize: bool = True  # False: prune only, whatever the plan's quant (the caller rounds later)

    def __post_init__(self):
        self.pruner = registry.get(registry.PRUNERS, self.plan.method, "method")
        self.method_cfg = method_config(self.pruner, self.plan.method_args)
        self.spec = self.plan.quant_spec if self.quantize else None

    def stack_key(self, stats) -> tuple | None:
        """Layers with equal keys are solved as one stacked matrix (see `Pruner.rows_independent`):
        the same statistics object, method, options and a row-wise pattern, no quantization."""
        p = self.plan
        kind = p.parsed_scheme.kind
        if not self.pruner.rows_independent or self.spec is not None or stats is None or \
                not (kind == "nm" or (kind == "unstructured" and p.per == "row")):
            return None
        return id(stats), p.method, p.scheme, p.sparsity, repr(self.method_cfg)

    def _prune(self, weight, stats, **kw):
        p = self.plan
        return self.pruner.prune(weight, stats, p.parsed_scheme, p.sparsity, p.per, self.method_cfg, **kw)

    def __call__(self, weight: torch.Tensor, stats):
        from sparsify.quant import rtn

        if self.spec is not None and self.pruner.joint_quant and self.joint_quant:
            # Scales come from a first, unquantized pass: the OBS updates grow weights past the dense
            # weight's range, and scales fitted to the dense weight would clip them (measured worse).
            quantize = rtn.column_quantizer(self._prune(weight, stats), self.spec)
            new = self._prune(weight, stats, quantize=quantize)
            return rtn.snap(new, quantize.params), quantize.params  # exactly on the grid in weight's dtype
        new = self._prune(weight, stats)
        return (new, None) if self.spec is None else rtn.fake_quantize(new, self.spec)


@dataclass
class PruneResult:
    qparams: dict = field(default_factory=dict)  # module -> QuantParams (quantized layers)
    solver: dict = field(default_factory=dict)  # module -> {"damp": .., "fallback": ..} (Hessian methods)
    warnings: list[str] = field(default_factory=list)
    calibration: dict | None = None


def solver_note(name: str, stats, requested: float | None) -> tuple[dict | None, str | None]:
    """What a Hessian-based solve used for ``name``, and a warning when it was not the requested damping."""
    if not hasattr(stats, "fallback"):
        return None, None
    info = {"damp": stats.damp_used, "fallback": bool(stats.fallback)}
    if stats.fallback:
        return info, f"{name}: the Hessian stayed singular at every damping; pruned by magnitude order with no update"
    if requested is not None and stats.damp_used is not None and stats.damp_used > requested:
        return info, f"{name}: Cholesky needed damping {stats.damp_used:g} (asked {requested:g})"
    return info, None


def prune_model(model, planned: Planned, batches: Callable[[], list[dict]], device: str = "cpu", joint_quant: bool = True,
                observers: dict | None = None, on_observed=None, residency=None,
                result: PruneResult | None = None, spill: str | None = None, quantize: bool = True) -> PruneResult:
    """Prune every active layer of ``planned`` in place; returns quant params, solver notes, warnings.

    Args:
        batches: returns the calibration batches; called only when some layer's method needs data.
        on_observed: ``(block_targets, observed)`` for runs that asked for ``observers``.
        residency: streamed weights (`sparsify.streaming.BlockStreamer`), handed to the runner.
        result: filled in place when given (the streamer packs each block with its quant params).
        spill: a directory for the calibration activations (`calibrate.spill`); None keeps them in memory.
        quantize: False prunes without the plans' quantization (no qparams): the caller quantizes later.
    """
    from sparsify.models.layout import find_blocks

    steps = {n: LayerStep(planned.plans[n], joint_quant, quantize) for mods in planned.active.values() for n in mods}
    kinds = {n: s.pruner.stats for n, s in steps.items()}
    result = PruneResult() if result is None else result

    def on_block(block_targets, stats, observed):
        stacks: dict = {}
        for name in block_targets:
            stacks.setdefault(steps[name].stack_key(stats[name]) or name, []).append(name)
        for names in stacks.values():  # q/k/v and gate/up as one matrix each where the method allows
            weights = [weight_of(block_targets[n]) for n in names]
            new, q = steps[names[0]](weights[0] if len(names) == 1 else torch.cat(weights), stats[names[0]])
            for name, part in zip(names, new.split([w.shape[0] for w in weights])):
                set_weight(block_targets[name], part)
            if q is not None:
                result.qparams[names[0]] = q
        for name in block_targets:
            info, warning = solver_note(name, stats[name], getattr(steps[name].method_cfg, "damp", None))
            if info is not None:
                result.solver[name] = info
            if warning:
                result.warnings.append(warning)
        if on_observed is not None and observed:
            on_observed(block_targets, observed)

    needs = any(k is not None for k in kinds.values()) or bool(observers)
    make_acc = lambda kind, n: registry.ACCUMULATORS[kind](n, device=device)  # noqa: E731
    runner.run(model, find_blocks(model), planned.active, batches() if needs else [], kinds, make_acc, on_block,
               device=device, observers=observers, residency=residency, spill=spill)
    return result
