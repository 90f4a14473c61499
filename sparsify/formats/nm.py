"""``nm``: N:M semi-structured sparsity along the input dimension (2:4, 4:8, ...).

Byte layout, for a dense W (out, in) with in % M == 0 and G = in // M groups per row (Triton kernels
read exactly this):

    values: (out, G*N) W's dtype: for each group its N kept values in ascending column order.
    meta:   (out, ceil(G*N*b/8)) uint8, b = bits per index = 2 if M <= 4, 4 if M <= 16, else 8.
            Index j of row r (the in-group position 0..M-1 of the j-th kept value) sits in byte
            (j*b)//8 of row r at bit offset (j*b) % 8, first index in the lowest bits; rows are
            padded to whole bytes.
    attrs:  {"n": N, "m": M, "bits": b, "shape": [out, in], "dtype": "float16" | ...}

Quantized (``quant=`` the weight's `QuantParams`; the weight is already fake-quantized):

    values: int8 (out, G*N) | int4: uint8 (out, ceil(G*N/2)), value j in byte j//2, low nibble =
            even j | fp8: float8_e4m3fn (out, G*N);   meta: unchanged;
    scale:  float32 (out, ngroups);  zero: uint8 (out, ngroups), asymmetric int4 only.
            group_size must be a multiple of M; packed value j of a row lies in dense column group
            ((j // N) * M) // group_size.
    attrs add: "quant": "int8" | "int4" | "fp8", "group_size": int (in when per channel), "symmetric".

2:4 fp16 takes in/2 * 2 + in/8 bytes per row: 0.5625x dense. A group with fewer than N non-zeros is
filled with its lowest-index zero positions (stored as +0.0, or the code of 0.0), so unpack is
bit-exact. "Non-zero" is the bit pattern: -0.0 is a kept value, and a kept value that quantized to
0.0 upstream is just a zero.
"""
from __future__ import annotations

from typing import Callable

import torch

from sparsify.formats.base import Format
from sparsify.formats.bits import as_ints, nonzero_bits, pack_bits, unpack_bits
from sparsify.formats.qvalues import decode_values, encode_values
from sparsify.quant.spec import QuantParams
from sparsify.tables import FORMATS


def index_bits(m: int) -> int:
    """Bits per stored in-group index."""
    return 2 if m <= 4 else 4 if m <= 16 else 8


def nm_mask_ok(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when in % m == 0 and every group of m consecutive inputs holds at most n non-zeros."""
    out, inp = weight.shape
    return inp % m == 0 and bool((nonzero_bits(weight).view(out, -1, m).sum(-1) <= n).all())


def _kept_index(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(out, G, n) int64 in-group positions, ascending: the non-zeros, then the lowest zero positions."""
    out, inp = weight.shape
    if inp % m:
        raise ValueError(f"N:M packing needs in_features divisible by {m}; got weight of shape {list(weight.shape)}")
    keep = nonzero_bits(weight).view(out, inp // m, m)  # (out, G, m)
    kept = keep.to(torch.int16).cumsum(-1, dtype=torch.int16)  # (out, G, m) non-zeros up to p
    count = kept[..., -1:]  # (out, G, 1)
    if count.numel() and int(count.max()) > n:
        raise ValueError(f"weight of shape {list(weight.shape)} is not {n}:{m} sparse (a group has > {n} non-zeros)")
    zeros = torch.arange(1, m + 1, dtype=torch.int16, device=weight.device) - kept  # (out, G, m) zeros up to p
    sel = keep | (zeros <= n - count)  # (out, G, m) exactly n per group
    return sel.view(-1, m).nonzero()[:, 1].view(out, inp // m, n)  # row-major: ascending within each group


def _take(idx: torch.Tensor, m: int) -> Callable:
    """dense (out, in) -> (out, G*n): the entries at ``idx`` (out, G, n), bit for bit."""
    out, groups, n = idx.shape
    return lambda t: as_ints(t).view(out, groups, m).gather(-1, idx).view(out, groups * n).view(t.dtype)


def _put(idx: torch.Tensor, m: int) -> Callable:
    """Inverse of `_take`: (out, G*n) -> dense (out, G*m) with zero bits elsewhere."""
    out, groups, n = idx.shape

    def put(values: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(out, groups, m, dtype=as_ints(values).dtype, device=idx.device)
        return dense.scatter_(-1, idx, as_ints(values).view(out, groups, n)).view(out, groups * m).view(values.dtype)

    return put


def pack(weight: torch.Tensor, n: int, m: int, quant: QuantParams | None = None) -> tuple[dict, dict]:
    """Dense (out, in) N:M weight -> ({"values", "meta"[, "scale", "zero"]}, attrs); layout above."""
    weight = weight.contiguous()
    out, inp = weight.shape
    if quant is not None and quant.spec.groups(inp)[0] % m:
        raise ValueError(f"quantization group {quant.spec.groups(inp)[0]} is not a multiple of M={m}")
    idx = _kept_index(weight, n, m)  # (out, G, n)
    tensors, qattrs = encode_values(weight, _take(idx, m), quant)
    b = index_bits(m)
    tensors["meta"] = pack_bits(idx.view(out, -1), b)  # (out, ceil(G*n*b/8))
    attrs = {"n": n, "m": m, "bits": b, "shape": [out, inp], "dtype": str(weight.dtype).removeprefix("torch.")}
    return tensors, {**attrs, **qattrs}


def unpack(tensors: dict, attrs: dict) -> torch.Tensor:
    """Packed -> the dense (out, in) weight, bit-exact, in attrs' dtype."""
    n, m, b = attrs["n"], attrs["m"], attrs["bits"]
    out, inp = attrs["shape"]
    meta = tensors["meta"]
    idx = unpack_bits(meta, b, inp // m * n).long().view(out, inp // m, n)  # (out, G, n)
    keep = torch.zeros(out, inp // m, m, dtype=torch.bool, device=meta.device).scatter_(-1, idx, True)
    return decode_values(tensors, attrs, keep.view(out, inp), _put(idx, m), inp // m * n)


FORMATS["nm"] = Format("nm", pack, unpack)
