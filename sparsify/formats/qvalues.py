"""Value encodings shared by the packed formats: the kept values stored as-is, or as quantized codes.

A format says which entries it keeps with two functions: ``take(dense) -> kept`` (nm: (out, k) in
column order; bitmask: (nnz,) row-major) and ``put(kept) -> dense`` (zero bits elsewhere).

    float: ``values`` = take(W) in W's dtype, bit for bit.
    int8:  ``values`` int8 codes.             fp8: ``values`` float8_e4m3fn codes.
    int4:  ``values`` uint8, two codes per byte: value j in byte j // 2, low nibble = even j
           (nm: per row, (out, ceil(k/2)); bitmask: the flat list, (ceil(nnz/2),)).
Quantized encodings add ``scale`` float32 (out, ngroups) and, for asymmetric int4, ``zero`` uint8
(out, ngroups); dense column c is in group c // group_size, and a value dequantizes with
`sparsify.quant.rtn`'s one formula, so a fake-quantized weight comes back bit for bit. Attrs add
``quant``, ``group_size`` (the actual size; in_features when per channel) and ``symmetric``.
"""
from __future__ import annotations

from typing import Callable

import torch

from sparsify.formats.bits import pack_bits, unpack_bits
from sparsify.quant import rtn
from sparsify.quant.spec import QuantParams, QuantSpec


def encode_values(weight: torch.Tensor, take: Callable, quant: QuantParams | None) -> tuple[dict, dict]:
    """The kept entries of ``weight`` (out, in) -> ({"values"[, "scale", "zero"]}, extra attrs)."""
    if quant is None:
        return {"values": take(weight)}, {}
    codes = take(rtn.quantize_codes(weight, quant))  # (out, k) or (nnz,)
    if quant.spec.kind == "int4":
        packed = pack_bits(codes if codes.dim() == 2 else codes.view(1, -1), 4)  # (rows, ceil(k/2))
        codes = packed if codes.dim() == 2 else packed.view(-1)
    tensors = {"values": codes, "scale": quant.scale.float().contiguous()}
    if quant.zero is not None:
        tensors["zero"] = quant.zero.to(torch.uint8).contiguous()
    return tensors, quant.attrs(weight.shape[1])


def decode_values(tensors: dict, attrs: dict, keep: torch.Tensor, put: Callable, count: int) -> torch.Tensor:
    """Inverse of `encode_values`: the dense (out, in) weight in attrs' dtype, +0.0 where not ``keep``.

    Args:
        count: kept values per row of ``values`` (nm: k; bitmask: nnz, one flat row).
    """
    dtype = getattr(torch, attrs["dtype"])
    values, kind = tensors["values"], attrs.get("quant")
    if kind is None:
        return put(values)
    if kind == "int4":
        rows = unpack_bits(values if values.dim() == 2 else values.view(1, -1), 4, count)  # (rows, count)
        values = rows if values.dim() == 2 else rows.view(-1)
    codes = put(values)  # (out, in), zero bits where not kept
    spec = QuantSpec(kind, attrs["group_size"], attrs["symmetric"])
    params = QuantParams(spec, tensors["scale"], tensors.get("zero"))
    dense = rtn.dequantize(codes, params, dtype)  # (out, in)
    return torch.where(keep, dense, torch.zeros((), dtype=dtype, device=dense.device))
