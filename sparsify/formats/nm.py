"""``nm``: N:M semi-structured sparsity along the input dimension (2:4, 4:8, ...).

Byte layout, for a dense W (out, in) with in % M == 0 and G = in // M groups per row:

    values: (out, G*N)  for each group its N kept values in ascending column order, in W's dtype
            (quantized: int8 / fp8 codes (out, G*N), or int4 uint8 (out, ceil(G*N/2)), see qvalues)
    meta:   (out, ceil(G*N*b/8)) uint8, b = 2 if M <= 4, 4 if M <= 16, else 8 bits per index.
            Index j of row r (the in-group position 0..M-1 of the j-th kept value) sits in byte
            (j*b)//8 of row r at bit offset (j*b) % 8, first index in the lowest bits.
    scale / zero: quantized only (see `sparsify.formats.qvalues`); value j is in dense column
            group ((j // N) * M + index) // group_size.
    attrs:  {"n", "m", "bits", "shape": [out, in], "dtype"} (+ "quant", "group_size", "symmetric")

2:4 fp16 therefore takes in/2 * 2 + in/8 bytes per row: 0.5625x dense. A group with fewer than N
non-zeros is filled with its lowest-index zero positions (stored as +0.0), so unpack is bit-exact.
"""
from __future__ import annotations

import torch

from sparsify.formats.base import Format
from sparsify.formats.bits import nonzero_bits, pack_bits, unpack_bits
from sparsify.formats.qvalues import decode_values, encode_values
from sparsify.registry import FORMATS


def index_bits(m: int) -> int:
    return 2 if m <= 4 else 4 if m <= 16 else 8


def nm_mask_ok(weight: torch.Tensor, n: int, m: int) -> bool:
    """Every group of m consecutive inputs holds at most n non-zeros."""
    return weight.shape[-1] % m == 0 and bool((nonzero_bits(weight).view(weight.shape[0], -1, m).sum(-1) <= n).all())


def _kept_index(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(out, G, n) in-group positions: the non-zeros, then the lowest zero positions, ascending."""
    out, inp = weight.shape
    if inp % m:
        raise ValueError(f"N:M packing needs in_features divisible by {m}; got weight of shape {list(weight.shape)}")
    keep = nonzero_bits(weight).view(out, inp // m, m)  # (out, G, m)
    if keep.numel() and int(keep.sum(-1).max()) > n:
        raise ValueError(f"weight of shape {list(weight.shape)} is not {n}:{m} sparse (a group has > {n} non-zeros)")
    pos = torch.arange(m, device=weight.device)
    score = keep.to(torch.int32) * (2 * m) + (m - 1 - pos)  # kept first, then lowest positions
    return score.topk(n, dim=-1).indices.sort(dim=-1).values  # (out, G, n)


def pack(weight: torch.Tensor, n: int, m: int, quant=None) -> tuple[dict, dict]:
    out, inp = weight.shape
    idx = _kept_index(weight, n, m)  # (out, G, n)
    values = weight.view(out, -1, m).gather(-1, idx).reshape(out, -1)  # (out, G*n)
    b = index_bits(m)
    cols = (idx + torch.arange(0, inp, m, device=weight.device).view(1, -1, 1)).reshape(out, -1)  # (out, G*n)
    rows = torch.arange(out, device=weight.device).view(-1, 1).expand_as(cols)
    if quant is not None and quant.spec.groups(inp)[0] % m:
        raise ValueError(f"quantization group {quant.spec.groups(inp)[0]} is not a multiple of M={m}")
    tensors, qattrs = encode_values(values, rows, cols, quant, inp)
    tensors["meta"] = pack_bits(idx.reshape(out, -1), b)
    attrs = {"n": n, "m": m, "bits": b, "shape": [out, inp], "dtype": str(weight.dtype).removeprefix("torch."),
             **qattrs}
    return tensors, attrs


def unpack(tensors: dict, attrs: dict) -> torch.Tensor:
    n, m, b = attrs["n"], attrs["m"], attrs["bits"]
    out, inp = attrs["shape"]
    dtype = getattr(torch, attrs["dtype"])
    meta = tensors["meta"]
    idx = unpack_bits(meta, b, inp // m * n)  # (out, G*n)
    cols = idx + torch.arange(0, inp, m, device=meta.device).repeat_interleave(n).view(1, -1)  # (out, G*n)
    rows = torch.arange(out, device=meta.device).view(-1, 1).expand_as(cols)
    values = decode_values(tensors, rows, cols, attrs, dtype)  # (out, G*n)
    dense = torch.zeros(out, inp, dtype=dtype, device=meta.device)
    return dense.scatter_(1, cols, values)


FORMATS["nm"] = Format("nm", pack, unpack)
