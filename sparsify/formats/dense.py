"""``dense``: the weight as it is, ``{"weight": W}`` (layers left dense or schemes without a packer).

attrs: {"shape": [out, in], "dtype"}.
"""
from __future__ import annotations

import torch

from sparsify.formats.base import Format
from sparsify.registry import FORMATS


def pack(weight: torch.Tensor, quant=None) -> tuple[dict, dict]:
    if quant is not None:
        raise ValueError("the dense format stores weights unquantized")
    return {"weight": weight}, {"shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch.")}


def unpack(tensors: dict, attrs: dict) -> torch.Tensor:
    return tensors["weight"]


FORMATS["dense"] = Format("dense", pack, unpack)
