"""Triton W8A8: int8 activations x N:M (2:4) int8 weights, int32 accumulation, scales in the epilogue.

    y[t, o] = (sum_k qx[t, k] * qw[o, k]) * sx[t] * sw[o] (+ bias[o])

Activations are quantized per token (dynamic, symmetric: sx = max(amax / 127, 1e-8), codes
round-half-even(x / sx) clamped to [-127, 127]) unless a static per-tensor scale from calibration is
given. The weight's int8 codes are placed into the dense register tile exactly as in `nm_matmul`
and fed to the int8 tensor cores; the epilogue is linear, so K splits add scaled fp32 partials.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsify.errors import UserError
from sparsify.kernels.triton.nm_matmul import (FLOATS, check_packed, launch, load_x, nm_index, nm_place, store_tile,
                                               tile_offsets)

# 1.5 * 2**23: (v + c) - c rounds |v| < 2**22 half-to-even in fp32, like torch.round (no libdevice rint needed)
ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _quantize_rows_kernel(
    # tensors: x (T, K) float, q (T, K) int8, s (T,) fp32, static (1,) fp32
    x_ptr, q_ptr, s_ptr, static_ptr,
    # sizes and row strides
    K, stride_x, stride_q,
    # options
    STATIC: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    if STATIC:
        scale = tl.load(static_ptr)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 127.0), 1e-8)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -127.0), 127.0)
        q = (q + ROUND_MAGIC) - ROUND_MAGIC  # round half to even
        tl.store(q_ptr + row * stride_q + offs, q.to(tl.int8), mask=offs < K)


def quantize_activations(x: torch.Tensor, act_scale: torch.Tensor | float | None = None):
    """x (T, K) float -> (int8 codes (T, K), fp32 scales (T,)): per token, or one static scale."""
    if x.dim() != 2 or x.dtype not in FLOATS:
        raise UserError(f"quantize_activations takes a 2-D fp32/fp16/bf16 x; got {x.dtype} {list(x.shape)}")
    T, K = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    q = torch.empty(T, K, dtype=torch.int8, device=x.device)
    s = torch.empty(T, dtype=torch.float32, device=x.device)
    static = s if act_scale is None else torch.as_tensor(act_scale, dtype=torch.float32).reshape(1).to(x.device)
    if T:
        _quantize_rows_kernel[(T,)](x, q, s, static, K, x.stride(0), q.stride(0), STATIC=act_scale is not None,
                                    BLOCK_K=min(1024, triton.next_power_of_2(K)))
    return q, s


@triton.jit
def _w8a8_kernel(
    # tensors: qx (T, K) int8, values (O, G*N) int8, meta uint8, sx (T,) fp32, sw (O,) fp32, bias (O,), y (T, O)
    x_ptr, vals_ptr, meta_ptr, sx_ptr, sw_ptr, bias_ptr, y_ptr,
    # sizes and row strides (elements)
    T, O, K, stride_x, stride_v, stride_m, stride_y,
    # packed layout
    N: tl.constexpr, M: tl.constexpr, B: tl.constexpr,
    # options
    HAS_BIAS: tl.constexpr,
    # tiles
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    BLOCK_G: tl.constexpr = BLOCK_K // M
    pid_k = tl.program_id(2)
    offs_t, offs_o, t_ok, o_ok = tile_offsets(T, O, BLOCK_T, BLOCK_O)
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.int32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_g = k0 // M + tl.arange(0, BLOCK_G)
        w_ok = o_ok[:, None] & (offs_g < K // M)[None, :]
        qx = load_x(x_ptr, offs_t, offs_k, t_ok, K, stride_x)  # (BLOCK_T, BLOCK_K) int8
        w = tl.zeros((BLOCK_O, BLOCK_G, M), dtype=tl.int8)
        for slot in tl.static_range(N):
            j = offs_g * N + slot  # (BLOCK_G,) packed index
            v = tl.load(vals_ptr + offs_o[:, None] * stride_v + j[None, :], mask=w_ok, other=0)
            w = nm_place(w, v, nm_index(meta_ptr, offs_o, j, w_ok, stride_m, B), M)
        acc = tl.dot(qx, tl.trans(tl.reshape(w, (BLOCK_O, BLOCK_K))), acc, out_dtype=tl.int32)
    sx = tl.load(sx_ptr + offs_t, mask=t_ok, other=0.0)
    sw = tl.load(sw_ptr + offs_o, mask=o_ok, other=0.0)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]  # (BLOCK_T, BLOCK_O)
    store_tile(y_ptr, y, bias_ptr, offs_t, offs_o, t_ok, o_ok, stride_y, pid_k, HAS_BIAS, SPLIT_K)


def w8a8_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, w_scale: torch.Tensor, n: int, m: int,
                act_scale: torch.Tensor | float | None = None, bias: torch.Tensor | None = None, *,
                config: dict | None = None) -> torch.Tensor:
    """x (..., in) float -> (..., out) in x's dtype, through int8 activations and int8 N:M weights.

    Args:
        values: int8 codes (out, in // m * n); w_scale: float32 per output channel, (out,) or (out, 1).
        act_scale: static per-tensor activation scale; None quantizes each token dynamically.
    """
    K, O = x.shape[-1], values.shape[0]
    check_packed(x, values, meta, n, m, bias)
    if values.dtype != torch.int8 or w_scale.numel() != O:
        raise UserError(f"w8a8 needs int8 values and one weight scale per output channel ({O}); "
                        f"got {values.dtype} and {w_scale.numel()} scales")
    qx, sx = quantize_activations(x.reshape(-1, K), act_scale)  # (T, K) int8, (T,)
    sw = w_scale.reshape(-1).float().contiguous()
    y = launch(_w8a8_kernel, qx, O, config, (values, meta, sx, sw, bias if bias is not None else sw),
               (values.stride(0), meta.stride(0)), out_dtype=x.dtype, N=n, M=m, B=2 if m <= 4 else 4,
               HAS_BIAS=bias is not None)
    return y.view(*x.shape[:-1], O)
