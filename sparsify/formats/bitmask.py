"""``bitmask``: unstructured sparsity as kept values + one bit per element + row offsets.

Byte layout, for a dense W (out, in):

    values:  (nnz,) the kept entries in row-major order, W's dtype (quantized: int8 / fp8 codes
             (nnz,) or int4 uint8 (ceil(nnz/2),), with scale / zero as in `sparsify.formats.qvalues`)
    mask:    (out, ceil(in/8)) uint8; bit c % 8 of byte c // 8 of row r is set when W[r, c] is kept
    row_ptr: (out+1,) int32 (int64 when nnz >= 2**31): offset of each row's first value in ``values``
    attrs:   {"shape": [out, in], "dtype"} (+ "quant", "group_size", "symmetric")

"Kept" means a non-zero bit pattern: +0.0 is dropped, -0.0 survives, so unpack is bit-exact.
"""
from __future__ import annotations

import torch

from sparsify.formats.base import Format
from sparsify.formats.bits import nonzero_bits, pack_bits, unpack_bits
from sparsify.formats.qvalues import decode_values, encode_values
from sparsify.registry import FORMATS


def pack(weight: torch.Tensor, quant=None) -> tuple[dict, dict]:
    out, inp = weight.shape
    keep = nonzero_bits(weight)  # (out, in)
    rows, cols = keep.nonzero(as_tuple=True)  # row-major
    tensors, qattrs = encode_values(weight[rows, cols], rows, cols, quant, inp)
    counts = keep.sum(1)
    ptr_dtype = torch.int32 if int(counts.sum()) < 2**31 else torch.int64
    tensors["mask"] = pack_bits(keep, 1)
    tensors["row_ptr"] = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(ptr_dtype)
    return tensors, {"shape": [out, inp], "dtype": str(weight.dtype).removeprefix("torch."), **qattrs}


def unpack(tensors: dict, attrs: dict) -> torch.Tensor:
    out, inp = attrs["shape"]
    dtype = getattr(torch, attrs["dtype"])
    keep = unpack_bits(tensors["mask"], 1, inp).bool()  # (out, in)
    rows, cols = keep.nonzero(as_tuple=True)
    dense = torch.zeros(out, inp, dtype=dtype, device=keep.device)
    dense[rows, cols] = decode_values(tensors, rows, cols, attrs, dtype)
    return dense


FORMATS["bitmask"] = Format("bitmask", pack, unpack)
