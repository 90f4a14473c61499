"""The packed-format contract (the packer -> file / kernel handoff).

A format turns a dense weight (zeros where pruned) into a flat ``dict[str, Tensor]`` plus a
JSON-able ``attrs`` dict, and back, bit-exactly. Tensors are stored in the artifact as
``{module}.{key}``; attrs go to the manifest. Byte size is the sum of the packed tensors' bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Format:
    name: str
    pack: Callable  # (weight: Tensor, **options) -> (dict[str, Tensor], attrs: dict)
    unpack: Callable  # (tensors: dict[str, Tensor], attrs: dict) -> Tensor (dense, original dtype/shape)


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """True storage size of a packed weight in bytes."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
