"""Bit packing shared by the formats: small unsigned codes packed low-bits-first into uint8 rows.

Code ``j`` of a row (``b`` bits each, b in {1, 2, 4, 8}) sits in byte ``(j*b) // 8`` at bit offset
``(j*b) % 8``; rows are padded to whole bytes with zero bits.
"""
from __future__ import annotations

import torch


def pack_bits(codes: torch.Tensor, b: int) -> torch.Tensor:
    """(rows, k) integer codes < 2**b -> (rows, ceil(k*b/8)) uint8."""
    per = 8 // b
    rows, k = codes.shape
    padded = torch.zeros(rows, -(-k // per) * per, dtype=torch.int32, device=codes.device)
    padded[:, :k] = codes.to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * b  # (per,)
    return (padded.view(rows, -1, per) << shifts).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """Inverse of `pack_bits`: (rows, nbytes) uint8 -> (rows, k) int64 codes."""
    per = 8 // b
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * b  # (per,)
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << b) - 1)  # (rows, nbytes, per)
    return codes.reshape(packed.shape[0], -1)[:, :k].long()


def nonzero_bits(weight: torch.Tensor) -> torch.Tensor:
    """True where the element's bit pattern is non-zero (+0.0 is dropped, -0.0 is kept)."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    return weight.view(ints) != 0
