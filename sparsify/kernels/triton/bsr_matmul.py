"""Triton BSR x dense matmul, y = x @ W^T (+ bias), for ``bsr`` weights (whole R x C tiles kept).

One program owns BLOCK_T token rows and one block row of W (R output features). It walks that
block row's stored tiles (``row_ptr[br] .. row_ptr[br+1]``): per tile, one (R, C) load of values,
the (BLOCK_T, C) activation columns the tile's ``col_idx`` names, and one `tl.dot`. Pruned tiles
are never read, so the work and the weight bytes both shrink with the block sparsity: unlike N:M,
the win is not capped by the bytes ratio alone. ``tl.dot`` needs every dimension >= 16 and
``tl.arange`` powers of two, so R and C must be powers of two >= 16 (`supported`); other tile
shapes take the reference path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsify.errors import UserError
from sparsify.kernels.triton.nm_matmul import FLOATS, INTERPRET, dot_acc, load_x, store_tile

BLOCK_T_GPU = (16, 32, 64, 128)  # token tile by token count (smallest tile >= tokens), untuned
BLOCK_T_INTERPRETER = 16


def supported(block) -> bool:
    """Tile shapes this kernel takes: both sides powers of two, at least 16."""
    return all(b >= 16 and b & (b - 1) == 0 for b in block)


@triton.jit
def _bsr_linear_kernel(
    # tensors: x (T, K), values (nnz, R, C), col_idx (nnz,) int32, row_ptr (Br+1,) int32/64, bias (O,), y (T, O)
    x_ptr, vals_ptr, col_ptr, rowptr_ptr, bias_ptr, y_ptr,
    # sizes: T tokens, O out features, K in features; row strides in elements
    T, O, K, stride_x, stride_y,
    # the format's tile
    R: tl.constexpr, C: tl.constexpr,
    # options
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    # token tile
    BLOCK_T: tl.constexpr,
):
    br = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = br * R + tl.arange(0, R)
    t_ok, o_ok = offs_t < T, offs_o < O
    tile = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]  # (R, C) offsets inside one stored tile
    acc = tl.zeros((BLOCK_T, R), dtype=tl.float32)
    start = tl.load(rowptr_ptr + br)
    end = tl.load(rowptr_ptr + br + 1)
    w_ptrs = vals_ptr + start.to(tl.int64) * (R * C) + tile  # the block row's first stored tile
    for j in range(start, end):
        col = tl.load(col_ptr + j)
        x = load_x(x_ptr, offs_t, col * C + tl.arange(0, C), t_ok, K, stride_x)  # (BLOCK_T, C)
        w = tl.load(w_ptrs)  # (R, C); edge tiles are zero-padded
        acc = dot_acc(x, w, acc, DOT_FP32)
        w_ptrs += R * C
    store_tile(y_ptr, acc, bias_ptr, offs_t, offs_o, t_ok, o_ok, stride_y, tl.program_id(2), HAS_BIAS, 1)


def check_bsr(x, values, col_idx, row_ptr, shape, bias) -> None:
    """Shape / dtype / device checks of the wrapper."""
    out, inp = shape
    nnz, r, c = values.shape if values.dim() == 3 else (None, None, None)
    if nnz is None or not supported((r, c)):
        raise UserError(f"bsr_linear takes (nnz, R, C) values with R, C powers of two >= 16; got {list(values.shape)}")
    if x.shape[-1] != inp:
        raise UserError(f"x (..., {x.shape[-1]}) does not match the weight's {inp} input features")
    if tuple(col_idx.shape) != (nnz,) or tuple(row_ptr.shape) != (-(-out // r) + 1,):
        raise UserError(f"col_idx {list(col_idx.shape)} / row_ptr {list(row_ptr.shape)} do not fit {nnz} tiles "
                        f"of a {out}x{inp} weight in {r}x{c} blocks")
    if x.dtype not in FLOATS or values.dtype not in FLOATS:
        raise UserError(f"bsr_linear takes fp32/fp16/bf16 x and values; got {x.dtype} and {values.dtype}")
    if any(t.device != x.device for t in (values, col_idx, row_ptr)):
        raise UserError(f"x is on {x.device} but the packed weight is not: move them together")
    if bias is not None and (tuple(bias.shape) != (out,) or bias.device != x.device):
        raise UserError(f"bias must have shape ({out},) on {x.device}; got {list(bias.shape)} on {bias.device}")


def bsr_linear(x: torch.Tensor, values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor,
               shape: tuple[int, int] | list[int], bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ W^T (+ bias) for a ``bsr`` packed W of dense ``shape`` (out, in) -> (..., out), x's dtype."""
    check_bsr(x, values, col_idx, row_ptr, shape, bias)
    out, inp = shape
    r, c = values.shape[1:]
    x2 = x.reshape(-1, inp).contiguous()  # (T, K)
    T = x2.shape[0]
    y = torch.empty(T, out, dtype=x.dtype, device=x.device)
    block_t = BLOCK_T_INTERPRETER if INTERPRET else next((b for b in BLOCK_T_GPU if T <= b), BLOCK_T_GPU[-1])
    if T and out:
        grid = (triton.cdiv(T, block_t), -(-out // r), 1)
        _bsr_linear_kernel[grid](x2, values.contiguous(), col_idx.contiguous(), row_ptr.contiguous(),
                                 bias if bias is not None else values, y, T, out, inp, x2.stride(0), y.stride(0),
                                 R=r, C=c, HAS_BIAS=bias is not None,
                                 DOT_FP32=INTERPRET or torch.float32 in (x.dtype, values.dtype), BLOCK_T=block_t)
    return y.view(*x.shape[:-1], out)
