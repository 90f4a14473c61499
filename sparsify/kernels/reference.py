"""Pure-torch ground truth for every sparse op: unpack the weight, then a dense matmul.

Always available (CPU, any device) and the oracle of the Triton kernels' tests. `nm_unpack_ref`
re-derives the N:M layout from its specification with plain indexing, independently of
`sparsify.formats.nm`, so the two implementations check each other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nm_unpack_ref(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, shape, bits: int) -> torch.Tensor:
    """Float N:M values + meta -> dense (out, in), straight from the layout in formats/nm.py."""
    out, inp = shape
    k = inp // m * n  # kept values per row
    j = torch.arange(k)
    byte = meta[:, (j * bits) // 8].long()  # (out, k)
    idx = (byte >> ((j * bits) % 8)) & ((1 << bits) - 1)  # in-group positions
    cols = (j // n) * m + idx  # (out, k)
    dense = torch.zeros(out, inp, dtype=values.dtype)
    dense[torch.arange(out)[:, None], cols] = values
    return dense


def quantize_activations_ref(x: torch.Tensor, static_scale=None) -> torch.Tensor:
    """W8A8's activation rounding, simulated: per-token (or static) symmetric int8, dequantized."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127 if static_scale is None else float(static_scale)
    return (torch.round(xf / scale).clamp(-127, 127) * scale).to(x.dtype)


def linear(x: torch.Tensor, fmt: str, tensors: dict[str, torch.Tensor], attrs: dict,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + b with W = unpack(fmt, tensors, attrs); w8a8 also rounds the activations."""
    from sparsify import formats

    weight = formats.unpack(fmt, tensors, attrs).to(x.dtype)  # (out, in)
    if attrs.get("activations") == "int8":
        x = quantize_activations_ref(x, tensors.get("input_scale"))
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
