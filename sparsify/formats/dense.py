"""``dense``: the weight as it is (layers left dense, or the ``dense`` scheme).

Byte layout:  weight: (out, in) W's dtype, unchanged (no copy).
attrs:        {"shape": [out, in], "dtype": "float16" | ...}.
"""
from __future__ import annotations

import torch

from sparsify.formats.base import Format
from sparsify.tables import FORMATS


def pack(weight: torch.Tensor, quant=None) -> tuple[dict, dict]:
    """``({"weight": weight}, attrs)``; quantized weights need a sparse format (nm / bitmask)."""
    if quant is not None:
        raise ValueError("the dense format stores weights unquantized")
    return {"weight": weight}, {"shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch.")}


def unpack(tensors: dict, attrs: dict) -> torch.Tensor:
    """The stored weight itself."""
    return tensors["weight"]


FORMATS["dense"] = Format("dense", pack, unpack)
