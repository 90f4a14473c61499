"""Block-wise distillation: no second model; blocks train one at a time, in order.

Block i's target is the same block with its dense weights read back from the checkpoint files
(`DenseWeights`), applied to the teacher's own input chain; the student block learns to map the
student's input (from the already distilled blocks) to it. ``steps`` optimizer steps per block,
feature loss only (no logits exist mid-model). Memory: one model, one block list's activations.
Each block runs with its own captured arguments (`sparsify.calibrate.capture`: masks and rotary
tables may differ per block), copied once out of inference mode so that autograd can use them.
"""
from __future__ import annotations

import dataclasses

import torch

from sparsify.calibrate.capture import capture, hidden_of
from sparsify.distill.dense import DenseWeights, load_teacher
from sparsify.distill.loss import normalized_mse
from sparsify.distill.train import masked_step, trainable
from sparsify.tensors import to_device


def _captured(model, layers, micro, device) -> tuple[list[torch.Tensor], list[list]]:
    """(block 0's input per micro-batch, per block the `Call` per micro-batch), as ordinary CPU tensors
    (shared ones copied once)."""
    cache, model.config.use_cache = getattr(model.config, "use_cache", None), False  # no KV cache in the kwargs
    try:
        hidden, calls = capture(model, layers, micro, device, "cpu")
    finally:
        model.config.use_cache = cache
    memo: dict = {}

    def plain(obj):
        return to_device(obj, "cpu", clone=True, memo=memo)

    return plain(hidden), [[dataclasses.replace(c, args=plain(c.args), kwargs=plain(c.kwargs)) for c in block]
                           for block in calls]


def run(loaded, flat, qparams, masks, settle, micro, source, config, steps, lr, per_step,
        advance) -> list[tuple[float, float]]:
    """Train ``flat`` in place, block by block; returns (first, last) step loss per trained block.

    ``qparams`` are the fake-quantization grids trained through ({} trains in float); ``settle(mods)``
    puts a trained block's weights on their final grid, before the next block reads its output."""
    from sparsify.models.layout import find_blocks

    model, dev, losses = loaded.model, config.device, []
    dense = DenseWeights(source, list(flat), lambda: load_teacher(loaded, source, "cpu"))
    for prefix, layers in find_blocks(model):
        s_in, calls = _captured(model, layers, micro, dev)
        t_in = s_in
        for i, block in enumerate(layers):

            def forward(x, j):
                return hidden_of(calls[i][j](block, x, dev))  # noqa: B023 (used within this iteration)

            mine = {n: lin for n, lin in flat.items() if n.startswith(f"{prefix}.{i}.")}
            pruned = {n: lin.weight.data for n, lin in mine.items()}
            for n, lin in mine.items():
                lin.weight.data = dense.get(n, lin.weight)
            with torch.no_grad():
                t_out = [forward(x, j).cpu() for j, x in enumerate(t_in)]  # dense block on the teacher chain
            for n, lin in mine.items():
                lin.weight.data = pruned[n]
            if mine:
                with trainable(mine, qparams) as params:
                    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False)
                    keep, curve = [masks[n] for n in mine], []
                    for step in range(steps):
                        total = 0.0
                        for j in [(step * per_step + k) % len(micro) for k in range(per_step)]:
                            loss = normalized_mse(forward(s_in[j], j), t_out[j].to(dev)) / per_step
                            loss.backward()
                            total += loss.item()
                        masked_step(opt, params, keep)
                        curve.append(total)
                        advance()
                settle(mine)
                losses.append((curve[0], curve[-1]) if curve else (0.0, 0.0))
            with torch.no_grad():
                s_in = [forward(x, j).cpu() for j, x in enumerate(s_in)]
            t_in = t_out
    return losses
