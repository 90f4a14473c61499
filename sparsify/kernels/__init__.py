"""Kernel dispatch: picks the implementation of a packed linear by device, format and size.

On CPU everything goes through `reference` (unpack + dense matmul).
"""
from __future__ import annotations

import torch

from sparsify.kernels import reference


def linear(x: torch.Tensor, fmt: str, tensors: dict[str, torch.Tensor], attrs: dict,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Packed-weight linear layer: (..., in) -> (..., out)."""
    return reference.linear(x, fmt, tensors, attrs, bias)
