"""Moving the tensors inside nested model inputs (tuples, lists, dicts of tensors and other values).

Used wherever captured block inputs or model kwargs change device: calibration capture, latency
benchmarks and block-wise distillation. Non-tensor values (None, ints, cache objects) pass as they are.
"""
from __future__ import annotations

import torch


def to_device(obj, device, memo: dict | None = None, *, clone: bool = False):
    """``obj`` with every tensor in nested tuples / lists / dicts moved to ``device``.

    ``clone=True`` returns fresh ordinary tensors even when nothing moves: tensors captured under
    ``torch.inference_mode`` cannot take part in autograd (distillation trains on them), copies can.
    ``memo`` (a dict kept across calls: id -> (source, copy)) moves a tensor shared by several inputs
    (rotary tables, masks) once; it keeps the source alive so that its id cannot be reused meanwhile.
    """
    if isinstance(obj, torch.Tensor):
        if memo is not None and id(obj) in memo:
            return memo[id(obj)][1]
        moved = obj.to(device)
        moved = moved.clone() if clone else moved
        if memo is not None:
            memo[id(obj)] = (obj, moved)
        return moved
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device, memo, clone=clone) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo, clone=clone) for k, v in obj.items()}
    return obj
