"""The allocator contract: `Allocator` (registered by name) and the `AllocationContext` it reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from sparsify.plan import LayerPlan


@dataclass(frozen=True)
class Allocator:
    name: str
    config_cls: type
    allocate: Callable  # (ctx: AllocationContext, config) -> (dict[str, LayerPlan], dict)
    summary: str = ""


@dataclass
class AllocationContext:
    """What an allocator may read: the model, the plan, the targets by block, and a dense pass."""

    model: object
    plans: dict[str, LayerPlan]
    targets: dict[str, dict[str, object]]  # block name -> {module name: module}
    blocks: list  # (prefix, ModuleList) in forward order
    batches: Callable[[], list[dict]]  # calibration batches, built on first use
    device: str = "cpu"
    numel: dict[str, int] = field(default_factory=dict)
    family: str = ""  # the model family's name (sparsify.models.family): which loss a scoring pass uses

    def adjustable(self) -> dict[str, str]:
        """{module: block name} of the layers whose sparsity an allocator may set."""
        return {name: block for block, mods in self.targets.items() for name in mods
                if not self.plans[name].skip and self.plans[name].parsed_scheme.kind in ("unstructured", "block")}

    def dense_pass(self, kinds: dict[str, str | None], on_block, observers=None, label="allocating") -> None:
        """Run the runner over the unpruned model: ``on_block(block_targets, stats, observed)`` only reads."""
        from sparsify.calibrate import runner
        from sparsify.calibrate.stats import ACCUMULATORS  # importing the module registers them

        make_acc = lambda kind, n: ACCUMULATORS[kind](n, device=self.device)  # noqa: E731
        runner.run(self.model, self.blocks, self.targets, self.batches(), kinds, make_acc, on_block,
                   device=self.device, observers=observers, label=label)
