"""``bsr``: block sparse rows, for ``block:RxC`` schemes (whole R x C tiles kept or removed).

Byte layout, for a dense W (out, in) tiled into Br = ceil(out / R) block rows and Bc = ceil(in / C)
block columns (edge tiles padded with +0.0 to full size):

    values:  (nnz_blocks, R, C) W's dtype: the kept tiles, block-row-major (by block row, then column)
    col_idx: (nnz_blocks,) int32: the block column of each kept tile
    row_ptr: (Br + 1,) int32 (int64 when nnz_blocks >= 2**31): offset of each block row's first tile
    attrs:   {"block": [R, C], "shape": [out, in], "dtype": "float16" | ...}

This is torch's BSR layout (``crow_indices`` = row_ptr, ``col_indices`` = col_idx), so the runtime
can hand it to ``torch.sparse_bsr_tensor`` without copying. A tile is kept when any of its elements
has a non-zero bit pattern (-0.0 counts, as in ``bitmask``), so unpack is bit-exact; the padding of
edge tiles is counted in the byte size, because it is stored. Unquantized weights only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsify.formats.base import Format
from sparsify.formats.bits import as_ints
from sparsify.tables import FORMATS


def _tiles(weight: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """(out, in) -> (Br, Bc, R, C), edges padded with +0.0 (as raw bits, so any dtype works)."""
    out, inp = weight.shape
    bits = F.pad(as_ints(weight), (0, -inp % c, 0, -out % r))  # (Br*R, Bc*C)
    br, bc = bits.shape[0] // r, bits.shape[1] // c
    return bits.view(br, r, bc, c).permute(0, 2, 1, 3)  # (Br, Bc, R, C)


def pack(weight: torch.Tensor, block: tuple[int, int] | list[int], quant=None) -> tuple[dict, dict]:
    """Dense (out, in) weight with whole zero tiles -> ({"values", "col_idx", "row_ptr"}, attrs); layout above."""
    if quant is not None:
        raise ValueError("the bsr format stores unquantized weights")
    r, c = int(block[0]), int(block[1])
    tiles = _tiles(weight.contiguous(), r, c)  # (Br, Bc, R, C) raw bits
    keep = (tiles != 0).any(-1).any(-1)  # (Br, Bc)
    rows, cols = keep.nonzero(as_tuple=True)  # block-row-major
    counts = keep.sum(1)  # (Br,)
    ptr_dtype = torch.int32 if int(counts.sum()) < 2**31 else torch.int64
    tensors = {
        "values": tiles[rows, cols].contiguous().view(weight.dtype),  # (nnz, R, C)
        "col_idx": cols.to(torch.int32),  # (nnz,)
        "row_ptr": torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(ptr_dtype),  # (Br+1,)
    }
    return tensors, {"block": [r, c], "shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch.")}


def block_rows(row_ptr: torch.Tensor) -> torch.Tensor:
    """The block row of each stored tile, from the row offsets: (nnz,) int64."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()  # (Br,)
    return torch.repeat_interleave(torch.arange(len(counts), device=row_ptr.device), counts)


def unpack(tensors: dict, attrs: dict) -> torch.Tensor:
    """Packed -> the dense (out, in) weight, bit-exact, in attrs' dtype."""
    (r, c), (out, inp) = attrs["block"], attrs["shape"]
    values = tensors["values"]
    br, bc = -(-out // r), -(-inp // c)
    tiles = torch.zeros(br, bc, r, c, dtype=as_ints(values).dtype, device=values.device)  # (Br, Bc, R, C)
    tiles[block_rows(tensors["row_ptr"]), tensors["col_idx"].long()] = as_ints(values)
    dense = tiles.permute(0, 2, 1, 3).reshape(br * r, bc * c)[:out, :inp]  # (out, in) raw bits
    return dense.contiguous().view(getattr(torch, attrs["dtype"]))


FORMATS["bsr"] = Format("bsr", pack, unpack)
