"""Turn pruned dense weights into packed tensors plus their manifest entries, and sum them up.

Shared by the calibrated pipeline and the streaming bare-file path, so both write identical entries.
"""
from __future__ import annotations

import torch

from sparsify import formats
from sparsify.formats.base import nbytes


def pack_weight(module: str, weight: torch.Tensor, fmt: str, options: dict,
                layout: str = "linear") -> tuple[dict, dict]:
    """Pack one pruned (out, in) weight; returns ({key: tensor}, manifest entry).

    ``layout`` records how the source module stores it ("conv1d": transposed, see models/targets.py).
    """
    tensors, attrs = formats.pack(fmt, weight, **options)
    nnz = int(torch.count_nonzero(weight))
    entry = {
        "module": module, "format": fmt, "layout": layout, "keys": list(tensors), "shape": list(weight.shape),
        "dtype": str(weight.dtype).removeprefix("torch."), "attrs": attrs, "numel": weight.numel(), "nnz": nnz,
        "sparsity": 1 - nnz / max(1, weight.numel()), "bytes": nbytes(tensors),
        "dense_bytes": weight.numel() * weight.element_size(),
    }
    return tensors, entry


def skip_reason(weight: torch.Tensor, scheme) -> str | None:
    """Why a targeted weight cannot take the scheme (None when it can)."""
    if weight.dim() != 2:
        return f"not a matrix (shape {list(weight.shape)})"
    if scheme.kind == "nm" and weight.shape[1] % scheme.m:
        return f"in_features {weight.shape[1]} is not a multiple of {scheme.m}"
    return None


def totals(entries: dict[str, dict]) -> dict:
    numel = sum(e["numel"] for e in entries.values())
    nnz = sum(e["nnz"] for e in entries.values())
    packed = sum(e["bytes"] for e in entries.values())
    dense = sum(e["dense_bytes"] for e in entries.values())
    return {"targets": len(entries), "numel": numel, "nnz": nnz, "sparsity": 1 - nnz / numel if numel else 0.0,
            "packed_bytes": packed, "dense_bytes": dense, "ratio": packed / max(1, dense)}
