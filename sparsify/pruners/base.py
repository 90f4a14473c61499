"""The pruner contract.

A pruner is a config dataclass (its own hyper-parameters) plus a pure function

    prune(weight, stats, scheme, sparsity, per, config) -> pruned weight

``weight`` is the dense (out, in) float weight; ``stats`` is the layer's accumulator
(`sparsify.calibrate.stats`) named by ``Pruner.stats``, or None for data-free methods.
The result is a new dense tensor of the same shape and dtype with +0.0 where the mask removed
values (and, for methods that update weights, the updated kept values). This dense-with-zeros
tensor is the pruner -> packer handoff.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Pruner:
    name: str
    config_cls: type  # dataclass of the method's hyper-parameters
    stats: str | None  # key into registry.ACCUMULATORS, None when data-free
    prune: Callable  # (weight, stats, scheme, sparsity, per, config) -> Tensor
    summary: str = ""
    joint_quant: bool = False  # prune() takes ``quantize=`` and quantizes inside its own loop (SparseGPT)
    keeps_weights: bool = False  # the weights stay as they are (``none``): its layers are copied, not packed
    rows_independent: bool = False  # with per-row or N:M masks each output row is solved on its own, so layers
    # that share the statistics may be stacked into one matrix and solved in one call (SparseGPT: one column loop)
