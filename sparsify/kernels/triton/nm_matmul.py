"""Triton N:M sparse x dense matmul, y = x @ W^T (+ bias), float values decompressed in registers.

Per (BLOCK_O out, BLOCK_K in) weight tile the kernel loads, for each of the N kept slots of the
BLOCK_G = BLOCK_K // M groups, one (BLOCK_O, BLOCK_G) tile of values and their meta indices, and
places them into a (BLOCK_O, BLOCK_G, M) register tile with `tl.where(index == position)`; the
reshape to (BLOCK_O, BLOCK_K) is the dense tile fed to `tl.dot`. No dense weight touches memory.
Triton has no sparse tensor-core instruction: the kernel wins by moving fewer bytes, so its
ceiling is dense bytes / packed bytes at memory-bound (small token count) shapes.

The device helpers `tile_offsets` / `load_x` / `nm_index` / `nm_place` / `dot_acc` / `store_tile` and the config table are
shared by `nm_matmul_wq` and `w8a8`.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from sparsify.errors import UserError

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# GPU tiles by token count: (max tokens, BLOCK_T, BLOCK_O, BLOCK_K, num_warps, num_stages). Starting
# points for an H100; they must be re-tuned from bench/kernels.py measurements.
CONFIGS = [(16, 16, 64, 128, 4, 4), (64, 32, 64, 128, 4, 4), (256, 64, 128, 64, 4, 3), (None, 128, 128, 64, 8, 3)]
INTERPRETER_CONFIG = {"BLOCK_T": 16, "BLOCK_O": 32, "BLOCK_K": 32, "SPLIT_K": 1}  # one config: no autotune there


@functools.lru_cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pick_config(tokens: int, out: int, k: int, device: torch.device) -> dict:
    """Tiles for a (tokens, k) x (k, out) problem; decode shapes with too few output tiles to fill
    the GPU split K across programs (fp32 atomics) so every SM streams weight bytes."""
    if INTERPRET or device.type != "cuda":
        return dict(INTERPRETER_CONFIG)
    bt, bo, bk, warps, stages = next(c[1:] for c in CONFIGS if c[0] is None or tokens <= c[0])
    tiles = triton.cdiv(tokens, bt) * triton.cdiv(out, bo)
    split = max(1, min(8, 2 * _sm_count(device.index or 0) // tiles, k // (4 * bk)))
    return {"BLOCK_T": bt, "BLOCK_O": bo, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": warps, "num_stages": stages}


@triton.jit
def tile_offsets(T, O, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr):
    """This program's token rows and output columns, with their in-bounds masks."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    return offs_t, offs_o, offs_t < T, offs_o < O


@triton.jit
def load_x(x_ptr, offs_t, offs_k, t_ok, K, stride_x):
    """The (BLOCK_T, BLOCK_K) activation tile, zero outside the matrix."""
    return tl.load(x_ptr + offs_t[:, None] * stride_x + offs_k[None, :], mask=t_ok[:, None] & (offs_k < K)[None, :],
                   other=0)


@triton.jit
def nm_index(meta_ptr, offs_o, j, mask, stride_m, B: tl.constexpr):
    """In-group positions (BLOCK_O, BLOCK_G) of packed values j: byte (j*B)//8, bit (j*B)%8."""
    byte = tl.load(meta_ptr + offs_o[:, None] * stride_m + ((j * B) // 8)[None, :], mask=mask, other=0)
    return (byte.to(tl.int32) >> ((j * B) % 8)[None, :]) & ((1 << B) - 1)


@triton.jit
def nm_place(w, v, idx, M: tl.constexpr):
    """Put values v (BLOCK_O, BLOCK_G) at in-group positions idx into the tile w (BLOCK_O, BLOCK_G, M)."""
    pos = tl.arange(0, M)
    return tl.where(idx[:, :, None] == pos[None, None, :], v[:, :, None], w)


@triton.jit
def dot_acc(x, w, acc, DOT_FP32: tl.constexpr):
    """acc += x (BLOCK_T, BLOCK_K) @ w^T, w (BLOCK_O, BLOCK_K). DOT_FP32: exact fp32 (also the
    interpreter's bf16 workaround); otherwise w is cast to x's half dtype for the tensor cores."""
    if DOT_FP32:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w.to(x.dtype)), acc)


@triton.jit
def store_tile(y_ptr, acc, bias_ptr, offs_t, offs_o, t_ok, o_ok, stride_y, pid_k,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Epilogue: + bias (once, by the first K split), then store, or fp32 atomic add when K is split."""
    if HAS_BIAS:
        first = (pid_k == 0).to(tl.float32)  # the other K splits add no bias
        acc += tl.load(bias_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :] * first
    ptrs = y_ptr + offs_t[:, None] * stride_y + offs_o[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & o_ok[None, :])
    else:
        tl.atomic_add(ptrs, acc, mask=t_ok[:, None] & o_ok[None, :])


@triton.jit
def _nm_linear_kernel(
    # tensors: x (T, K), values (O, G*N), meta (O, ceil(G*N*B/8)) uint8, bias (O,), y (T, O)
    x_ptr, vals_ptr, meta_ptr, bias_ptr, y_ptr,
    # sizes: T tokens, O out features, K in features (dense); row strides in elements
    T, O, K, stride_x, stride_v, stride_m, stride_y,
    # packed layout: N kept of every M, B meta bits per index
    N: tl.constexpr, M: tl.constexpr, B: tl.constexpr,
    # options
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    # tiles; SPLIT_K programs share the K loop of one output tile
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
        w = tl.zeros((BLOCK_O, BLOCK_G, M), dtype=vals_ptr.dtype.element_ty)
        for slot in tl.static_range(N):
            j = offs_g * N + slot  # (BLOCK_G,) packed index
            v = tl.load(vals_ptr + offs_o[:, None] * stride_v + j[None, :], mask=w_ok, other=0.0)
            w = nm_place(w, v, nm_index(meta_ptr, offs_o, j, w_ok, stride_m, B), M)
        acc = dot_acc(x, tl.reshape(w, (BLOCK_O, BLOCK_K)), acc, DOT_FP32)
    store_tile(y_ptr, acc, bias_ptr, offs_t, offs_o, t_ok, o_ok, stride_y, pid_k, HAS_BIAS, SPLIT_K)


def check_packed(x, values, meta, n, m, bias, k_cols: int | None = None) -> None:
    """Shape / dtype / layout checks shared by the wrappers; ``k_cols`` = expected values width."""
    K, O = x.shape[-1], values.shape[0]
    if m not in (2, 4, 8, 16) or not 0 < n < m:
        raise UserError(f"N:M kernels support M in 2, 4, 8, 16 and 0 < N < M; got {n}:{m}: use the reference path")
    if K % m:
        raise UserError(f"input features {K} not divisible by M={m}: the activations do not match this weight")
    k = K // m * n
    meta_cols = -(-k * (2 if m <= 4 else 4) // 8)
    if values.dim() != 2 or values.shape[1] != (k if k_cols is None else k_cols):
        raise UserError(f"values {list(values.shape)} do not fit x (..., {K}) at {n}:{m}: check the packed weight")
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (O, meta_cols):
        raise UserError(f"meta must be uint8 ({O}, {meta_cols}); got {meta.dtype} {list(meta.shape)}")
    if not (values.is_contiguous() and meta.is_contiguous()):
        raise UserError("packed values / meta must be contiguous: call .contiguous() once when loading")
    if values.device != x.device or meta.device != x.device:
        raise UserError(f"x is on {x.device} but the packed weight on {values.device}: move them together")
    if bias is not None and (tuple(bias.shape) != (O,) or bias.device != x.device):
        raise UserError(f"bias must have shape ({O},) on {x.device}; got {list(bias.shape)} on {bias.device}")


def launch(kernel, x, out_features, config, tensors: tuple, sizes: tuple, out_dtype=None, **meta) -> torch.Tensor:
    """Flatten x to (T, K), allocate y (fp32 when K is split), launch, return (..., out) in ``out_dtype``
    (default x's dtype)."""
    K, out_dtype = x.shape[-1], out_dtype or x.dtype
    x2 = x.reshape(-1, K).contiguous()  # (T, K)
    T = x2.shape[0]
    cfg = dict(config or pick_config(T, out_features, K, x.device))
    split = cfg.get("SPLIT_K", 1)
    if split > 1:
        y = torch.zeros(T, out_features, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(T, out_features, dtype=out_dtype, device=x.device)
    if T and out_features:
        grid = (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(out_features, cfg["BLOCK_O"]), split)
        kernel[grid](x2, *tensors, y, T, out_features, K, x2.stride(0), *sizes, y.stride(0), **meta,
                     **{"SPLIT_K": split, **cfg})
    return y.to(out_dtype).view(*x.shape[:-1], out_features)


def nm_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, n: int, m: int,
              bias: torch.Tensor | None = None, *, config: dict | None = None) -> torch.Tensor:
    """x (..., in) @ W^T (+ bias) for an N:M packed W with float values -> (..., out) in x's dtype.

    Args:
        values: (out, in // m * n) fp32 / fp16 / bf16; meta: (out, ceil(in//m*n*b/8)) uint8.
        config: tile override (BLOCK_T, BLOCK_O, BLOCK_K, SPLIT_K, ...); default from `pick_config`.
    """
    check_packed(x, values, meta, n, m, bias)
    if x.dtype not in FLOATS or values.dtype not in FLOATS:
        raise UserError(f"nm_linear takes fp32/fp16/bf16 x and values; got {x.dtype} and {values.dtype}")
    dot_fp32 = INTERPRET or torch.float32 in (x.dtype, values.dtype)
    return launch(_nm_linear_kernel, x, values.shape[0], config, (values, meta, bias if bias is not None else values),
                  (values.stride(0), meta.stride(0)), N=n, M=m, B=2 if m <= 4 else 4,
                  HAS_BIAS=bias is not None, DOT_FP32=dot_fp32)
