"""The block-by-block calibration runner.

For each list of repeated transformer blocks (one for a LM, two for CLIP), capture the inputs of
its first block and every block's own other arguments (`sparsify.calibrate.capture`), then for each
block: (1) forward every calibration batch with hooks that feed the targeted matrices' inputs to
statistics accumulators (and with any observers attached, e.g. queries and keys per head),
(2) hand the statistics to ``on_block`` (which prunes, or only records for an allocator's pass),
(3) forward again to produce the next block's inputs from the block as ``on_block`` left it. Only
one block's statistics exist at a time; captured activations live on CPU (``offload=True``) or on
the compute device, or on disk one file per batch (``spill``, `calibrate.spill`). Activations that turn NaN / inf stop the run with the block's name.

Data parallel (`sparsify.calibrate.distributed`, under torchrun): each process runs its share of the
batches; between (1) and (2) the block's accumulators and observations are all-reduced, so that
``on_block`` sees the statistics of every window on every process. The steps around that collective
run inside ``agreed()``, so that an error on one process stops all of them there.
"""
from __future__ import annotations

from contextlib import ExitStack, nullcontext
from typing import Callable

import torch
from torch import nn

from sparsify import progress
from sparsify.calibrate import distributed
from sparsify.calibrate.capture import capture, hidden_of
from sparsify.calibrate.spill import store_factory
from sparsify.errors import UserError
from sparsify.resources import keep_freed_memory, return_freed_memory


def check_finite(x: torch.Tensor, where: str) -> None:
    """UserError when x holds NaN / inf. A float32 sum is finite whenever every value is (short of
    an overflow in the sum itself), and costs a tenth of ``isfinite``; the exact test confirms."""
    if not torch.isfinite(x.sum(dtype=torch.float32)) and not torch.isfinite(x).all():
        raise UserError(f"calibration activations are NaN/inf {where}: the checkpoint overflows in this dtype "
                        "or holds bad weights; try --dtype float32 or check the checkpoint")


def forward_block(block: nn.Module, name: str, hidden, calls: list, device, store, keep: bool, outs=None):
    """Run one block on every batch; returns its outputs (on ``store``, appended to ``outs``: a new
    list if None) when ``keep``."""
    outs = [] if outs is None else outs
    with torch.inference_mode():
        for x, call in zip(hidden, calls):
            out = hidden_of(call(block, x, device))
            if keep:
                check_finite(out, f"at the output of {name}")
                outs.append(out.to(store))
    return outs


class StatsDone(Exception):
    """Raised by the last target's input hook: the rest of the block's forward is not needed."""


def attach_stats(block_targets: dict[str, nn.Module], kinds: dict[str, str | None],
                 make_acc: Callable[[str, int], object]):
    """Forward pre-hooks that feed each target's input to an accumulator of its kind.

    Targets that read the same tensor and need the same kind (q/k/v, gate/up) share one accumulator,
    found by identity during the first forward. Each hook appends its target's name to ``order``; when
    ``stop["after"]`` names a target, its hook raises `StatsDone` once that input is recorded, so the
    statistics pass skips that target's product and everything after it (a Llama block's down_proj).
    Returns ({name: accumulator}, hook handles, seen, order, stop).
    """
    owner: dict[str, object] = {}
    leaders: set[str] = set()
    seen: list[tuple[torch.Tensor, str, object]] = []  # strong refs so ids cannot be reused mid-forward
    order: list[str] = []
    stop: dict[str, str | None] = {"after": None}
    handles = []

    def make_hook(name, kind):
        def hook(_m, inputs):
            x = inputs[0]
            if name not in owner:
                acc = next((a for t, k, a in seen if t is x and k == kind), None)
                if acc is None:
                    acc = make_acc(kind, x.shape[-1])
                    seen.append((x, kind, acc))
                    leaders.add(name)
                owner[name] = acc
            if name in leaders:
                owner[name].add_batch(x.detach())
            order.append(name)
            if name == stop["after"]:
                raise StatsDone
        return hook

    for name, module in block_targets.items():
        if kinds.get(name) is not None:
            handles.append(module.register_forward_pre_hook(make_hook(name, kinds[name])))
    return owner, handles, seen, order, stop


def last_single_call(order: list[str]) -> str | None:
    """The target to stop after, from one whole forward's call order: the last one, if every target
    ran exactly once (a target called twice, e.g. a shared layer, needs the whole forward)."""
    return order[-1] if order and len(set(order)) == len(order) else None


def statistics(block: nn.Module, name: str, block_targets: dict[str, nn.Module], kinds: dict[str, str | None],
               make_acc, observers: dict[str, Callable], hidden: list[torch.Tensor], calls: list,
               device) -> tuple[dict[str, object], dict[str, object]]:
    """One block's statistics pass: ({target: its accumulator or None}, {observer name: what it saw}).

    The first batch runs the whole block and shows the order of the targets; later batches stop
    after the last target's input (`StatsDone`) unless observers watch the block.
    """
    owner, handles, seen, order, stop = attach_stats(block_targets, kinds, make_acc)
    try:
        with ExitStack() as stack, torch.inference_mode():
            observed = {k: stack.enter_context(f(block)) for k, f in observers.items()}
            for j, (x, call) in enumerate(zip(hidden, calls)):
                try:
                    call(block, x, device)
                except StatsDone:
                    pass
                if j == 0 and not observers:
                    stop["after"] = last_single_call(order)
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    return {n: owner.get(n) for n in block_targets}, observed


def run(model: nn.Module, blocks: list[tuple[str, nn.ModuleList]], targets: dict[str, dict[str, nn.Module]],
        batches: list[dict], kinds: dict[str, str | None], make_acc: Callable[[str, int], object] | None,
        on_block: Callable[[dict[str, nn.Module], dict[str, object], dict[str, object]], None],
        device: str = "cpu", offload: bool = True, observers: dict[str, Callable] | None = None,
        label: str = "pruning", residency=None, spill: str | None = None) -> None:
    """Calibrate (and prune) block by block.

    Args:
        blocks: ``(prefix, ModuleList)`` in forward order (from `models.layout.find_blocks`).
        targets: block name (``prefix.i``) -> {module name: Linear or Conv1D} to hand to ``on_block``.
        kinds: module name -> accumulator kind (``registry.ACCUMULATORS``) or None (data-free).
        make_acc: ``(kind, in_features) -> accumulator``.
        on_block: ``(block_targets, stats, observed)`` once per block: stats maps each target to its
            accumulator (None when data-free); observed maps each observer name to what it saw.
            It may change the weights in place: the next block's inputs come from the block as left.
        observers: name -> ``factory(block)``, a context manager active during the statistics pass
            whose ``as`` value is handed to ``on_block`` (see `calibrate.observers`).
        residency: for streamed weights (`sparsify.streaming.BlockStreamer`): ``capturing(name, block)``
            around the capture (which runs block 0), ``enter(name, block)`` before a block's statistics,
            ``leave(name, block)`` once it is done.
        spill: a directory: keep the activations there (`calibrate.spill.DiskActivations`), not in memory.
    """
    observers = observers or {}
    needs_data = bool(batches) and (observers or any(k is not None for k in kinds.values()))
    batches = distributed.shard(batches) if needs_data else batches
    if residency is not None:
        return_freed_memory()  # streamed: freed blocks go back to the system
    elif needs_data:
        keep_freed_memory()  # every batch allocates the same activation buffers again
    store = "cpu" if offload or spill else device
    new_store = store_factory(spill)
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    try:
        for prefix, layers in blocks:
            names = [f"{prefix}.{i}" for i in range(len(layers))]
            hidden, calls = None, None
            with distributed.agreed():
                if needs_data:
                    with residency.capturing(names[0], layers[0]) if residency is not None else nullcontext():
                        hidden, calls = capture(model, layers, batches, device, store, new_store())
                    for x in hidden:
                        check_finite(x, f"at the input of {names[0]}")
            with progress.bar(f"{label} {prefix}", total=len(layers)) as advance:
                for i, (name, block) in enumerate(zip(names, layers)):
                    block_targets = targets.get(name, {})
                    if residency is not None:
                        with distributed.agreed():  # a bad tensor in one process's read stops them all
                            residency.enter(name, block)
                    stats_needed = hidden is not None and (observers or any(kinds.get(n) for n in block_targets))
                    stats, observed = dict.fromkeys(block_targets), {}
                    if stats_needed:
                        with distributed.agreed():
                            stats, observed = statistics(block, name, block_targets, kinds, make_acc, observers,
                                                         hidden, calls[i], device)
                        distributed.reduce_stats({"targets": stats, "observed": observed})
                    with distributed.agreed():
                        on_block(block_targets, stats, observed)
                        del stats
                        if hidden is not None and name != names[-1]:
                            done, hidden = hidden, forward_block(block, name, hidden, calls[i], device, store,
                                                                 keep=True, outs=new_store())
                            done.clear()
                        if residency is not None:
                            residency.leave(name, block)
                    advance()
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
