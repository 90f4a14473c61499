"""Triton N:M sparse x dense matmul, y = x @ W^T (+ bias), the weight decompressed in registers.

One kernel serves float values (fp32 / fp16 / bf16) and weight-only int8 / int4 / fp8 codes
(dequantized in the tile, see `nm_tile.packed_tile`). A Triton 2:4 kernel has no sparse tensor-core
instruction: it wins by moving fewer bytes, so its ceiling is dense bytes / packed bytes at
memory-bound (small token count) shapes.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sparsify.kernels.triton.nm_tile import packed_tile

QUANT_CODES = {None: 0, "int8": 1, "int4": 2, "fp8": 3}
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _nm_linear_kernel(
    # pointers
    x_ptr, vals_ptr, meta_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
    # sizes: T tokens, O outputs, K inputs (dense)
    T, O, K,
    # strides (elements; inner strides are 1)
    stride_x, stride_v, stride_m, stride_s, stride_y,
    # packed layout
    N: tl.constexpr, M: tl.constexpr, B: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr, ZERO: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    # tiles
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t, pid_o = tl.program_id(0), tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    t_ok, o_ok = offs_t < T, offs_o < O
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        w = packed_tile(vals_ptr, meta_ptr, scale_ptr, zero_ptr, offs_o, offs_k, o_ok, k_ok,
                        stride_v, stride_m, stride_s, N, M, B, QUANT, GROUP, ZERO, HAS_ZERO)  # (BLOCK_O, BLOCK_K)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w))
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_t[:, None] * stride_y + offs_o[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=t_ok[:, None] & o_ok[None, :])


def _tiles(tokens: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_O, BLOCK_K) by token count: decode shapes are weight-bandwidth bound."""
    if INTERPRET:
        return 16, 32, 32
    return (16, 64, 128) if tokens <= 16 else (64, 128, 64) if tokens <= 256 else (128, 128, 64)


def nm_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, n: int, m: int, bits: int,
              out_features: int, *, quant: str | None = None, scale: torch.Tensor | None = None,
              zero: torch.Tensor | None = None, group_size: int | None = None,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ W^T for an N:M packed W (out, in); float values or weight-only int8/int4/fp8 codes."""
    K = x.shape[-1]
    if K % m or meta.shape[0] != out_features or values.shape[0] != out_features:
        raise ValueError(f"nm_linear: x (..., {K}) does not match a packed {n}:{m} weight of {out_features} rows")
    if quant not in QUANT_CODES or (quant is not None and (scale is None or group_size is None)):
        raise ValueError(f"nm_linear: quant {quant!r} needs scale and group_size")
    x2 = x.reshape(-1, K).contiguous()  # (T, K)
    T = x2.shape[0]
    y = torch.empty(T, out_features, dtype=x.dtype, device=x.device)
    values, meta = values.contiguous(), meta.contiguous()
    dummy = values  # unused pointer slots
    BT, BO, BK = _tiles(T)
    grid = (triton.cdiv(T, BT), triton.cdiv(out_features, BO))
    _nm_linear_kernel[grid](
        x2, values, meta, scale if scale is not None else dummy, zero if zero is not None else dummy,
        bias if bias is not None else dummy, y,
        T, out_features, K,
        x2.stride(0), values.stride(0), meta.stride(0), scale.stride(0) if scale is not None else 0, y.stride(0),
        N=n, M=m, B=bits, QUANT=QUANT_CODES[quant], GROUP=group_size or K,
        ZERO=8.0 if quant == "int4" else 0.0, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None,
        DOT_FP32=INTERPRET or x.dtype == torch.float32 or quant == "fp8",
        BLOCK_T=BT, BLOCK_O=BO, BLOCK_K=BK)
    return y.view(*x.shape[:-1], out_features)
