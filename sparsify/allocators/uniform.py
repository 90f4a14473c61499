"""``--allocation uniform``: every layer keeps the sparsity its plan gives (Wanda's and SparseGPT's own choice)."""
from __future__ import annotations

from dataclasses import dataclass

from sparsify.allocators.base import AllocationContext, Allocator
from sparsify.plan import LayerPlan
from sparsify.tables import ALLOCATORS


@dataclass
class UniformConfig:
    """No options."""


def allocate(ctx: AllocationContext, config: UniformConfig) -> tuple[dict[str, LayerPlan], dict]:
    return dict(ctx.plans), {}


ALLOCATORS["uniform"] = Allocator("uniform", UniformConfig, allocate, "the plan's sparsity for every layer")
