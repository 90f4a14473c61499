"""``bitmask``: unstructured sparsity as kept values + one bit per element + row offsets.

Byte layout, for a dense W (out, in):

    values:  (nnz,) W's dtype, the kept entries in row-major order
    mask:    (out, ceil(in/8)) uint8; bit c % 8 of byte c // 8 of row r is set when W[r, c] is kept
             (lowest bit first; the row's last byte is padded with zero bits)
    row_ptr: (out+1,) int32 (int64 when nnz >= 2**31): offset of each row's first value in ``values``
    attrs:   {"shape": [out, in], "dtype": "float16" | ...}

Quantized (``quant=`` the weight's `QuantParams`; the weight is already fake-quantized):

    values:  int8 (nnz,) | int4: uint8 (ceil(nnz/2),), value j in byte j // 2, low nibble = even j |
             fp8: float8_e4m3fn (nnz,);   mask, row_ptr: unchanged;
    scale:   float32 (out, ngroups);  zero: uint8 (out, ngroups), asymmetric int4 only; column c is
             in group c // group_size.
    attrs add: "quant": "int8" | "int4" | "fp8", "group_size": int (in when per channel), "symmetric".

"Kept" means a non-zero bit pattern: +0.0 is dropped, -0.0 survives, so unpack is bit-exact. A
value that quantized to 0.0 upstream is a zero like any other and is dropped.
"""
from __future__ import annotations

import torch

from sparsify.formats.base import Format
from sparsify.formats.bits import nonzero_bits, pack_bits, scatter_bits, select_bits, unpack_bits
from sparsify.formats.qvalues import decode_values, encode_values
from sparsify.quant.spec import QuantParams
from sparsify.tables import FORMATS


def pack(weight: torch.Tensor, quant: QuantParams | None = None) -> tuple[dict, dict]:
    """Dense (out, in) weight -> ({"values", "mask", "row_ptr"[, "scale", "zero"]}, attrs); layout above."""
    weight = weight.contiguous()
    out, inp = weight.shape
    keep = nonzero_bits(weight)  # (out, in)
    tensors, qattrs = encode_values(weight, lambda t: select_bits(t, keep), quant)  # (nnz,) row-major
    counts = keep.sum(1)  # (out,)
    ptr_dtype = torch.int32 if int(counts.sum()) < 2**31 else torch.int64
    tensors["mask"] = pack_bits(keep, 1)  # (out, ceil(in/8))
    tensors["row_ptr"] = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(ptr_dtype)  # (out+1,)
    return tensors, {"shape": [out, inp], "dtype": str(weight.dtype).removeprefix("torch."), **qattrs}


def unpack(tensors: dict, attrs: dict) -> torch.Tensor:
    """Packed -> the dense (out, in) weight, bit-exact, in attrs' dtype."""
    out, inp = attrs["shape"]
    keep = unpack_bits(tensors["mask"], 1, inp).bool()  # (out, in)
    nnz = int(tensors["row_ptr"][-1])
    return decode_values(tensors, attrs, keep, lambda values: scatter_bits(keep, values), nnz)


FORMATS["bitmask"] = Format("bitmask", pack, unpack)
