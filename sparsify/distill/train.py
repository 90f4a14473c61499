"""What trains during distillation, and how it stays on the pruned (and quantized) weights' terms.

- `trainable`: only the targeted Linears' weights get gradients, seen through `FakeQuant` where the
  packer will quantize them.
- `FakeQuant`: the straight-through fake quantizer (forward on the packer's FIXED grid, backward identity).
- `masked_step`: the optimizer step that cannot touch a pruned position.
- `refit`: round-to-nearest scales fitted to the trained weights (``--distill-quant after``: trained in float).
- `finalize`: the exit step that puts weights back on their grid with exactly the entry mask.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsify.quant import rtn


class FakeQuant(nn.Module):
    """Weight parametrization: forward = the weight snapped onto its FIXED quantization grid, backward =
    identity (straight-through estimator). Scales broadcast per group, so no per-element copy of them
    is kept; the arithmetic is `rtn.snap`'s, element for element."""

    def __init__(self, params, in_features: int):
        super().__init__()
        self.params = params
        size, ngroups = params.spec.groups(in_features)
        self.size = size if size * ngroups == in_features else None  # None: ragged last group, use rtn.snap
        zero = params.zero.float() if params.zero is not None else torch.full_like(
            params.scale, 8.0 if params.spec.kind == "int4" else 0.0)
        self.register_buffer("scale", params.scale.unsqueeze(-1), persistent=False)  # (out, ngroups, 1)
        self.register_buffer("zero", zero.unsqueeze(-1), persistent=False)  # (out, ngroups, 1)

    def snap(self, w: torch.Tensor) -> torch.Tensor:
        if self.size is None:
            return rtn.snap(w, self.params)
        g = w.view(w.shape[0], -1, self.size)  # (out, ngroups, size)
        scale, zero = self.scale.to(w.device), self.zero.to(w.device)
        q = rtn.decode(rtn.encode(g, scale, zero, self.params.spec.kind), scale, zero, w.dtype)
        return q.view_as(w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.snap(w.detach()) - w).detach()


@contextmanager
def trainable(flat: dict[str, nn.Linear], qparams: dict):
    """Fake quantization attached where asked; yields the leaf weights that train, with requires_grad."""
    for name, lin in flat.items():
        if qparams.get(name) is not None:
            parametrize.register_parametrization(lin, "weight", FakeQuant(qparams[name], lin.in_features))
    params = [lin.parametrizations.weight.original if parametrize.is_parametrized(lin) else lin.weight
              for lin in flat.values()]
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        for p in params:
            p.requires_grad_(False)
        for lin in flat.values():
            if parametrize.is_parametrized(lin):
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)


def masked_step(opt: torch.optim.Optimizer, params: list[nn.Parameter], masks: list[torch.Tensor]) -> None:
    """Zero the gradients at pruned positions, step, re-apply the mask (pruned weights stay exactly 0)."""
    with torch.no_grad():
        for p, keep in zip(params, masks):
            if p.grad is not None:
                p.grad.mul_(keep)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, keep in zip(params, masks):
            p.mul_(keep)


def refit(flat: dict[str, nn.Linear], specs: dict, qparams: dict) -> None:
    """Set, in place, ``qparams[name]`` to round-to-nearest params of ``specs[name]`` fitted to the layer's
    current (trained, masked) weight, for every layer with a spec."""
    for name, lin in flat.items():
        if specs.get(name) is not None:
            qparams[name] = rtn.compute_params(lin.weight.detach(), specs[name])


def _smallest_on_grid(sign: torch.Tensor, params, rows: torch.Tensor, cols: torch.Tensor, in_features: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """The grid value one step from zero with ``sign`` (the other sign where the grid has no such value,
    e.g. asymmetric int4 with zero point 0) at elements (rows, cols)."""
    scale, zero = rtn.expand_params(params, rows, cols, in_features)  # (k,), (k,)

    def on_grid(v):
        return rtn.decode(rtn.encode(v, scale, zero, params.spec.kind), scale, zero, dtype)

    first = on_grid(sign * scale)  # (k,)
    return torch.where(first == 0, on_grid(-sign * scale), first)


def finalize(flat: dict[str, nn.Linear], masks: dict[str, torch.Tensor], signs: dict[str, torch.Tensor],
             qparams: dict) -> int:
    """Snap each weight onto its quantization grid (if any), nudge a kept weight that is exactly 0.0 to
    the smallest non-zero value of its entry sign (grid step, or the dtype's smallest normal number),
    zero the pruned positions. Returns how many kept weights were nudged."""
    nudged = 0
    with torch.no_grad():
        for name, lin in flat.items():
            w, keep, p = lin.weight, masks[name], qparams.get(name)
            q = rtn.snap(w, p) if p is not None else w.clone()  # (out, in)
            rows, cols = (keep & (q == 0)).nonzero(as_tuple=True)
            if rows.numel():
                nudged += rows.numel()
                sign = signs[name][rows, cols].float()  # (k,)
                q[rows, cols] = (_smallest_on_grid(sign, p, rows, cols, w.shape[1], w.dtype) if p is not None
                                 else (sign * torch.finfo(w.dtype).tiny).to(w.dtype))
            w.copy_(torch.where(keep, q, torch.zeros((), dtype=w.dtype)))
    return nudged
