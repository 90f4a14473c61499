"""Triton N:M matmul with weight-only quantized values: int8 / int4 (or fp8) codes dequantized in registers.

Same tiling as `nm_matmul`: each (BLOCK_O, BLOCK_G) slot tile of codes is loaded once, dequantized
as ((code - zero) * scale) in fp32 with the scale (and zero) of its quant group, placed into the dense
register tile and multiplied with x. int4 stores two codes per byte (value j in byte j // 2, low
nibble = even j); a 2:4 int4 weight is then 0.3125 bytes per dense element, 6.4x less than fp16.
Quant group of packed value j: ((j // N) * M) // group_size, i.e. the group of its dense column.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsify.errors import UserError
from sparsify.kernels.triton.nm_matmul import (FLOATS, INTERPRET, check_packed, dot_acc, launch, load_x, nm_index,
                                               nm_place, store_tile, tile_offsets)

QUANT_CODES = {"int8": 1, "int4": 2, "fp8": 3}
CODE_DTYPES = {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}


@triton.jit
def _nm_linear_wq_kernel(
    # tensors: x (T, K); values (O, G*N) codes, int4: (O, ceil(G*N/2)) bytes; meta uint8;
    # scale fp32 (O, ngroups); zero uint8 (O, ngroups) (asymmetric int4 only); bias (O,); y (T, O)
    x_ptr, vals_ptr, meta_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
    # sizes and row strides (elements)
    T, O, K, stride_x, stride_v, stride_m, stride_s, stride_y,
    # packed layout
    N: tl.constexpr, M: tl.constexpr, B: tl.constexpr,
    # quantization: QUANT 1 int8, 2 int4, 3 fp8; GROUP dense columns per scale; ZERO when no zero tensor
    QUANT: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, ZERO: tl.constexpr,
    # options
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    # tiles
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    BLOCK_G: tl.constexpr = BLOCK_K // M
    pid_k = tl.program_id(2)
    offs_t, offs_o, t_ok, o_ok = tile_offsets(T, O, BLOCK_T, BLOCK_O)
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_g = k0 // M + tl.arange(0, BLOCK_G)
        w_ok = o_ok[:, None] & (offs_g < K // M)[None, :]
        x = load_x(x_ptr, offs_t, offs_k, t_ok, K, stride_x)  # (BLOCK_T, BLOCK_K)
        q_idx = offs_o[:, None] * stride_s + ((offs_g * M) // GROUP)[None, :]  # (BLOCK_O, BLOCK_G) quant group
        scale = tl.load(scale_ptr + q_idx, mask=w_ok, other=0.0)
        if HAS_ZERO:
            zero = tl.load(zero_ptr + q_idx, mask=w_ok, other=0).to(tl.float32)
        else:
            zero = ZERO
        w = tl.zeros((BLOCK_O, BLOCK_G, M), dtype=tl.float32)
        for slot in tl.static_range(N):
            j = offs_g * N + slot  # (BLOCK_G,) packed index
            if QUANT == 2:
                byte = tl.load(vals_ptr + offs_o[:, None] * stride_v + (j // 2)[None, :], mask=w_ok, other=0)
                code = ((byte.to(tl.int32) >> ((j % 2) * 4)[None, :]) & 15).to(tl.float32)
            else:  # int8 or fp8 codes, one per element (no `other`: fp8 has none; masked below)
                code = tl.load(vals_ptr + offs_o[:, None] * stride_v + j[None, :], mask=w_ok).to(tl.float32)
            v = tl.where(w_ok, (code - zero) * scale, 0.0)  # (BLOCK_O, BLOCK_G) dequantized in fp32
            w = nm_place(w, v, nm_index(meta_ptr, offs_o, j, w_ok, stride_m, B), M)
        acc = dot_acc(x, tl.reshape(w, (BLOCK_O, BLOCK_K)), acc, DOT_FP32)
    store_tile(y_ptr, acc, bias_ptr, offs_t, offs_o, t_ok, o_ok, stride_y, pid_k, HAS_BIAS, SPLIT_K)


def nm_linear_wq(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor | None, n: int, m: int, quant: str, group_size: int,
                 bias: torch.Tensor | None = None, *, config: dict | None = None) -> torch.Tensor:
    """x (..., in) @ dequant(W)^T (+ bias) -> (..., out) in x's dtype; W N:M packed with int8/int4/fp8 codes.

    Args:
        values: int8 (out, k) | int4 uint8 (out, ceil(k/2)) | float8_e4m3fn (out, k), k = in // m * n.
        scale: float32 (out, ceil(in / group_size)); zero: uint8, same shape, asymmetric int4 only.
        group_size: dense input columns per scale (the whole row for per-channel).
    """
    if quant not in QUANT_CODES:
        raise UserError(f"weight-only quant {quant!r} is not one of {', '.join(QUANT_CODES)}")
    K, O = x.shape[-1], values.shape[0]
    k = K // m * n
    check_packed(x, values, meta, n, m, bias, k_cols=-(-k // 2) if quant == "int4" else k)
    if values.dtype != CODE_DTYPES[quant] or x.dtype not in FLOATS:
        raise UserError(f"{quant} codes must be {CODE_DTYPES[quant]} (got {values.dtype}); x fp32/fp16/bf16")
    if group_size <= 0 or tuple(scale.shape) != (O, -(-K // group_size)) or scale.dtype != torch.float32:
        raise UserError(f"scale must be float32 ({O}, {-(-K // group_size)}) for group size {group_size}; "
                        f"got {scale.dtype} {list(scale.shape)}")
    if zero is not None and (quant != "int4" or zero.shape != scale.shape or zero.dtype != torch.uint8):
        raise UserError("zero points are uint8 shaped like scale, for asymmetric int4 only")
    scale = scale.contiguous()
    zero_t = zero.contiguous() if zero is not None else scale
    tensors = (values, meta, scale, zero_t, bias if bias is not None else scale)
    return launch(_nm_linear_wq_kernel, x, O, config, tensors,
                  (values.stride(0), meta.stride(0), scale.stride(0)), N=n, M=m, B=2 if m <= 4 else 4,
                  QUANT=QUANT_CODES[quant], GROUP=group_size, HAS_ZERO=zero is not None,
                  ZERO=8.0 if quant == "int4" else 0.0, HAS_BIAS=bias is not None,
                  DOT_FP32=INTERPRET or x.dtype == torch.float32)
