"""Value encodings shared by the packed formats: kept values stored as-is, or as quantized codes.

Float:  ``values`` in the weight's dtype.
int8:   ``values`` int8 codes.      int4: ``values`` uint8, two codes per byte, value j in byte j // 2,
fp8:    ``values`` float8_e4m3fn.         low nibble = even j (last dimension padded to even).
Quantized encodings add ``scale`` float32 (out, ngroups) and, for asymmetric int4, ``zero`` uint8
(out, ngroups); dense column c is in group c // group_size. Dequantization is `sparsify.quant.rtn.decode`.
"""
from __future__ import annotations

import torch

from sparsify.formats.bits import pack_bits, unpack_bits
from sparsify.quant import rtn


def encode_values(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, quant, in_features: int):
    """Kept values (out, k) or (nnz,) with their dense coordinates -> ({key: tensor}, extra attrs)."""
    if quant is None:
        return {"values": values.contiguous()}, {}
    scale, zero = rtn.expand_params(quant, rows, cols, in_features)
    codes = rtn.encode(values, scale, zero, quant.spec.kind)
    if quant.spec.kind == "int4":
        codes = pack_bits(codes.reshape(-1, codes.shape[-1]), 4).reshape(*codes.shape[:-1], -1)
    tensors = {"values": codes.contiguous(), "scale": quant.scale.float().contiguous()}
    if quant.zero is not None:
        tensors["zero"] = quant.zero.contiguous()
    return tensors, quant.attrs(in_features)


def decode_values(tensors: dict, rows: torch.Tensor, cols: torch.Tensor, attrs: dict, dtype) -> torch.Tensor:
    """Inverse of `encode_values`: values shaped like ``rows`` in ``dtype``."""
    codes, kind = tensors["values"], attrs.get("quant")
    if kind is None:
        return codes
    if kind == "int4":
        flat = codes.reshape(-1, codes.shape[-1])
        codes = unpack_bits(flat, 4, rows.shape[-1]).reshape(rows.shape)
    scale, zero = rtn.expand(tensors["scale"], tensors.get("zero"), kind, attrs["group_size"], rows, cols)
    return rtn.decode(codes, scale, zero, dtype)
