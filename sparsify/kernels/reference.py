"""Pure-torch ground truth for every sparse op: unpack the weight, then a dense matmul.

Always available (CPU, any device); the oracle for the Triton kernels' tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsify import formats


def linear(x: torch.Tensor, fmt: str, tensors: dict[str, torch.Tensor], attrs: dict,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + b with W = unpack(fmt, tensors, attrs).  x (..., in) -> (..., out)."""
    weight = formats.unpack(fmt, tensors, attrs).to(x.dtype)  # (out, in)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
