"""Turn the `SparseLinear` modules of a loaded artifact back into plain `nn.Linear` (zeros kept).

Used as the dense baseline of `sparsify bench` and by exporters that need a plain torch model.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsify.runtime.sparse_linear import SparseLinear


def dense_linear(module: SparseLinear) -> nn.Linear:
    """A plain Linear with the unpacked (dequantized) weight, in the artifact's dtype and device."""
    weight = module.dense_weight()  # (out, in)
    lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                    device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        lin.bias = nn.Parameter(module.bias.detach().to(weight.dtype), requires_grad=False)
    return lin


def densify(model: nn.Module) -> nn.Module:
    """Replace every SparseLinear of ``model`` in place; returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear):
            model.set_submodule(name, dense_linear(module))
    return model


@torch.no_grad()
def sparse_modules(model: nn.Module) -> dict[str, SparseLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}
