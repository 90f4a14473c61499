"""Bit-level helpers shared by the formats: small unsigned codes packed low-bits-first into uint8
rows, bit-exact selection / scatter of elements, and the "kept" test on bit patterns.

Packing: code ``j`` of a row (``b`` bits each, b in {1, 2, 4, 8}) sits in byte ``(j*b) // 8`` at bit
offset ``(j*b) % 8``; rows are padded to whole bytes with zero bits.
"""
from __future__ import annotations

import torch

_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def pack_bits(codes: torch.Tensor, b: int) -> torch.Tensor:
    """(rows, k) integer codes < 2**b -> (rows, ceil(k*b/8)) uint8."""
    per = 8 // b
    rows, k = codes.shape
    padded = torch.zeros(rows, -(-k // per) * per, dtype=torch.uint8, device=codes.device)
    padded[:, :k] = codes
    slots = padded.view(rows, -1, per)  # (rows, nbytes, per)
    packed = slots[..., 0].clone()  # (rows, nbytes)
    for i in range(1, per):  # at most 8 bit slots, each a whole-tensor op
        packed |= slots[..., i] << (i * b)
    return packed.contiguous()


def unpack_bits(packed: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """Inverse of `pack_bits`: (rows, nbytes) uint8 -> (rows, k) uint8 codes."""
    per = 8 // b
    shifts = torch.arange(0, 8, b, device=packed.device, dtype=torch.uint8)  # (per,)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << b) - 1)  # (rows, nbytes, per)
    return codes.reshape(packed.shape[0], -1)[:, :k]


def nonzero_bits(weight: torch.Tensor) -> torch.Tensor:
    """True where the element's bit pattern is non-zero (+0.0 is dropped, -0.0 is kept)."""
    return as_ints(weight) != 0


def as_ints(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as the signed integer type of its element size: moves and compares raw bits, for
    any dtype (fp8 included, whose own scatter kernels are missing on CPU)."""
    return t.view(_INTS[t.element_size()])


def select_bits(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``t[keep]`` (row-major, flat), copied bit for bit."""
    return as_ints(t)[keep].view(t.dtype)


def scatter_bits(keep: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Inverse of `select_bits`: a tensor shaped like ``keep`` in ``flat``'s dtype, zero bits elsewhere."""
    dense = torch.zeros(keep.shape, dtype=_INTS[flat.element_size()], device=keep.device)
    return dense.masked_scatter_(keep, as_ints(flat.reshape(-1))).view(flat.dtype)
