"""Allocators: how sparse each layer may be, decided after target discovery and before pruning.

An allocator is a config dataclass plus a function ``allocate(ctx, config) -> (plans, info)``,
registered by name in `sparsify.registry.ALLOCATORS`. It reads the resolved per-layer plan from
the `AllocationContext`, may run its own passes over the model (``ctx.dense_pass`` runs the
block-by-block runner on the dense model with any statistics and observers, pruning nothing; a
later allocator may take gradients or perturb weights), and returns the plan with new
``sparsity`` values for the layers it may change (`adjustable`: unstructured and block schemes,
not skipped), keeping their parameter-weighted sparsity. ``info`` (JSON-able: per group score and
sparsity) goes to the manifest. The result is a plan, so ``--save-allocation`` can write it and a
later run can prune from it without allocating again.
"""
from sparsify.allocators import ecoflap, lpvit, owl, uniform  # noqa: F401  (registration)
