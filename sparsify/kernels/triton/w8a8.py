"""Triton W8A8: int8 activations x 2:4 (N:M) int8 weights, int32 accumulation, scales in the epilogue.

y[t, o] = (sum_k qx[t, k] * qw[o, k]) * sx[t] * sw[o]; activations are quantized per token
(dynamic, symmetric amax / 127) unless a static per-tensor scale from calibration is given.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsify.kernels.triton.nm_matmul import INTERPRET
from sparsify.kernels.triton.nm_tile import packed_tile


def quantize_activations(x: torch.Tensor, static_scale: torch.Tensor | float | None = None):
    """x (T, K) -> (int8 codes (T, K), float32 scales (T,)): per token, or one static scale."""
    xf = x.float()
    if static_scale is None:
        scale = xf.abs().amax(-1).clamp(min=1e-8) / 127  # (T,)
    else:
        scale = torch.full((x.shape[0],), float(static_scale), device=x.device)
    q = torch.round(xf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


@triton.jit
def _w8a8_kernel(
    # pointers
    qx_ptr, sx_ptr, vals_ptr, meta_ptr, sw_ptr, bias_ptr, y_ptr,
    # sizes
    T, O, K,
    # strides
    stride_x, stride_v, stride_m, stride_y,
    # packed layout
    N: tl.constexpr, M: tl.constexpr, B: tl.constexpr, HAS_BIAS: tl.constexpr,
    # tiles
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t, pid_o = tl.program_id(0), tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    t_ok, o_ok = offs_t < T, offs_o < O
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        qx = tl.load(qx_ptr + offs_t[:, None] * stride_x + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0)
        w = packed_tile(vals_ptr, meta_ptr, vals_ptr, vals_ptr, offs_o, offs_k, o_ok, k_ok,
                        stride_v, stride_m, 0, N, M, B, 0, 1, 0.0, False)  # int8 codes as exact floats
        acc += tl.dot(qx, tl.trans(w.to(tl.int8)))
    sx = tl.load(sx_ptr + offs_t, mask=t_ok, other=0.0)
    sw = tl.load(sw_ptr + offs_o, mask=o_ok, other=0.0)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_t[:, None] * stride_y + offs_o[None, :], y.to(y_ptr.dtype.element_ty),
             mask=t_ok[:, None] & o_ok[None, :])


def w8a8_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, w_scale: torch.Tensor, n: int, m: int,
                bits: int, *, act_scale=None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) float -> (..., out); ``values`` int8 codes, ``w_scale`` (out, 1) or (out,) float32."""
    K, O = x.shape[-1], values.shape[0]
    if values.dtype != torch.int8 or K % m:
        raise ValueError("w8a8_linear needs int8 N:M values and in_features divisible by M")
    qx, sx = quantize_activations(x.reshape(-1, K), act_scale)  # (T, K), (T,)
    T = qx.shape[0]
    y = torch.empty(T, O, dtype=x.dtype, device=x.device)
    BT, BO, BK = (16, 32, 32) if INTERPRET else ((16, 64, 128) if T <= 16 else (64, 128, 64))
    grid = (triton.cdiv(T, BT), triton.cdiv(O, BO))
    _w8a8_kernel[grid](qx, sx, values.contiguous(), meta.contiguous(), w_scale.reshape(-1).float().contiguous(),
                       bias if bias is not None else sx, y, T, O, K, qx.stride(0), values.stride(0), meta.stride(0),
                       y.stride(0), N=n, M=m, B=bits, HAS_BIAS=bias is not None, BLOCK_T=BT, BLOCK_O=BO, BLOCK_K=BK)
    return y.view(*x.shape[:-1], O)
