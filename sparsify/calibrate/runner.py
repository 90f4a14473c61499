"""The block-by-block calibration runner.

For each list of repeated transformer blocks (one for a LM, two for CLIP), capture the inputs of
its first block by running the model until that block (a pre-hook raises `_Stop`), then for each
block: (1) forward every calibration batch with hooks that feed the targeted Linears' inputs to
statistics accumulators, (2) hand the statistics to ``on_block`` (which prunes), (3) forward again
to produce the next block's inputs from the pruned block. Only one block's statistics exist at a
time; captured activations live on CPU (``offload=True``) or on the compute device.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sparsify import progress


class _Stop(Exception):
    pass


def _to(obj, device):
    """Move tensors inside nested tuples/lists/dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def capture_inputs(model: nn.Module, block: nn.Module, batches: list[dict], device, store) -> list[tuple]:
    """Run the model on each batch up to ``block``; returns its (args, kwargs) per batch on ``store``."""
    captured = []

    def hook(_module, args, kwargs):
        captured.append((_to(args, store), _to(kwargs, store)))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for batch in batches:
                try:
                    model(**_to(batch, device))
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError(f"captured {len(captured)} of {len(batches)} batches: the block never ran")
    return captured


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_hidden(args, kwargs, hidden):
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _forward_all(block, samples, device, store, keep_outputs: bool):
    outs = []
    with torch.inference_mode():
        for args, kwargs in samples:
            out = _hidden(block(*_to(args, device), **_to(kwargs, device)))
            if keep_outputs:
                outs.append(_replace_hidden(args, kwargs, out.to(store)))
    return outs


def _attach_stats(block_targets: dict[str, nn.Linear], make_acc: Callable[[int], object]):
    """Forward hooks that accumulate each target's input; Linears that read the same tensor share one
    accumulator (q/k/v, gate/up), found by identity during the first forward."""
    owner: dict[str, object] = {}
    leaders: set[str] = set()
    seen: list[tuple[torch.Tensor, object]] = []  # strong refs so ids cannot be reused mid-forward
    handles = []

    def make_hook(name):
        def hook(_m, inputs, _out):
            x = inputs[0]
            if name not in owner:
                acc = next((a for t, a in seen if t is x), None)
                if acc is None:
                    acc = make_acc(x.shape[-1])
                    seen.append((x, acc))
                    leaders.add(name)
                owner[name] = acc
            if name in leaders:
                owner[name].add_batch(x.detach())
        return hook

    for name, lin in block_targets.items():
        handles.append(lin.register_forward_hook(make_hook(name)))
    return owner, handles, seen


def run(model: nn.Module, blocks: list[tuple[str, nn.ModuleList]], targets: dict[str, dict[str, nn.Linear]],
        batches: list[dict], make_acc: Callable[[int], object] | None,
        on_block: Callable[[dict[str, nn.Linear], dict[str, object]], None],
        device: str = "cpu", offload: bool = True) -> None:
    """Calibrate and prune block by block.

    Args:
        blocks: ``(prefix, ModuleList)`` in forward order (from `models.layout.find_blocks`).
        targets: block name (``prefix.i``) -> {full Linear name: module} to prune.
        make_acc: ``in_features -> accumulator``; None for data-free methods (no forward passes).
        on_block: called once per block with its targets and their accumulators (None values when
            data-free); it must update the weights in place.
    """
    store = "cpu" if offload else device
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    try:
        for prefix, layers in blocks:
            names = [f"{prefix}.{i}" for i in range(len(layers))]
            samples = capture_inputs(model, layers[0], batches, device, store) if make_acc else None
            with progress.bar(f"pruning {prefix}", total=len(layers)) as advance:
                for name, block in zip(names, layers):
                    block_targets = targets.get(name, {})
                    if make_acc is None or not block_targets:
                        on_block(block_targets, {k: None for k in block_targets})
                    else:
                        owner, handles, seen = _attach_stats(block_targets, make_acc)
                        try:
                            _forward_all(block, samples, device, store, keep_outputs=False)
                        finally:
                            for h in handles:
                                h.remove()
                            seen.clear()
                        on_block(block_targets, owner)
                        del owner
                    if samples is not None and name != names[-1]:
                        samples = _forward_all(block, samples, device, store, keep_outputs=True)
                    advance()
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
