"""The Triton kernels as torch custom ops (``torch.ops.sparsify.*``), each with a fake (meta) impl,
so `torch.compile` and CUDA graphs capture them as single nodes instead of tracing into Triton; and
the CPU's C kernel (`sparsify.kernels.cpu.native`), used only while `torch.compile` traces (eager
calls go to it directly: a custom op's own dispatch costs ~30 us a call on CPU, as much as a
decode-sized matmul).

`torch.library.custom_op` (not `triton_op`) because it also compiles under the CPU interpreter
(ENV.md), where the tests run. No ``from __future__ import annotations``: the schema is inferred
from these annotations.
"""
from typing import Optional

import torch
from torch import Tensor

from sparsify.kernels.triton import bsr_matmul, nm_matmul, nm_matmul_wq, w8a8


def _empty_out(x: Tensor, values: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], values.shape[0]))  # (..., out)


@torch.library.custom_op("sparsify::nm_linear", mutates_args=())
def nm_linear(x: Tensor, values: Tensor, meta: Tensor, n: int, m: int, bias: Optional[Tensor] = None) -> Tensor:
    """`nm_matmul.nm_linear` as an op: float N:M weight."""
    return nm_matmul.nm_linear(x, values, meta, n, m, bias)


@nm_linear.register_fake
def _(x, values, meta, n, m, bias=None):
    return _empty_out(x, values)


@torch.library.custom_op("sparsify::nm_linear_wq", mutates_args=())
def nm_linear_wq(x: Tensor, values: Tensor, meta: Tensor, scale: Tensor, zero: Optional[Tensor], n: int, m: int,
                 quant: str, group_size: int, bias: Optional[Tensor] = None) -> Tensor:
    """`nm_matmul_wq.nm_linear_wq` as an op: int8 / int4 / fp8 codes, weight-only."""
    return nm_matmul_wq.nm_linear_wq(x, values, meta, scale, zero, n, m, quant, group_size, bias)


@nm_linear_wq.register_fake
def _(x, values, meta, scale, zero, n, m, quant, group_size, bias=None):
    return _empty_out(x, values)


@torch.library.custom_op("sparsify::w8a8_linear", mutates_args=())
def w8a8_linear(x: Tensor, values: Tensor, meta: Tensor, w_scale: Tensor, n: int, m: int,
                act_scale: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """`w8a8.w8a8_linear` as an op: int8 activations (dynamic per token, or static) x int8 weight."""
    return w8a8.w8a8_linear(x, values, meta, w_scale, n, m, act_scale, bias)


@w8a8_linear.register_fake
def _(x, values, meta, w_scale, n, m, act_scale=None, bias=None):
    return _empty_out(x, values)


@torch.library.custom_op("sparsify::bsr_linear", mutates_args=())
def bsr_linear(x: Tensor, values: Tensor, col_idx: Tensor, row_ptr: Tensor, out_features: int,
               bias: Optional[Tensor] = None) -> Tensor:
    """`bsr_matmul.bsr_linear` as an op: block-sparse float weight."""
    return bsr_matmul.bsr_linear(x, values, col_idx, row_ptr, (out_features, x.shape[-1]), bias)


@bsr_linear.register_fake
def _(x, values, col_idx, row_ptr, out_features, bias=None):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("sparsify::cpu_nm24_linear", mutates_args=())
def cpu_nm24_linear(x: Tensor, values: Tensor, meta: Tensor, scale: Optional[Tensor], zero: Optional[Tensor],
                    out_features: int, group_size: int, kind: str, bias: Optional[Tensor] = None) -> Tensor:
    """`native.nm24_linear` as an op: 2:4 float32 / int8 / int4 weight, x (..., in) float32 -> (..., out)."""
    from sparsify.kernels.cpu import native

    tensors = {"values": values, "meta": meta}
    tensors.update({k: t for k, t in (("scale", scale), ("zero", zero)) if t is not None})
    return native.nm24_linear(x, tensors, {"shape": [out_features, x.shape[-1]], "group_size": group_size}, kind, bias)


@cpu_nm24_linear.register_fake
def _(x, values, meta, scale, zero, out_features, group_size, kind, bias=None):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("sparsify::cpu_bsr_linear", mutates_args=())
def cpu_bsr_linear(x: Tensor, values: Tensor, col_idx: Tensor, row_ptr: Tensor, out_features: int,
                   bias: Optional[Tensor] = None) -> Tensor:
    """`native.bsr_linear` as an op: float32 block-sparse weight, x (..., in) float32 -> (..., out)."""
    from sparsify.kernels.cpu import native

    tensors = {"values": values, "col_idx": col_idx, "row_ptr": row_ptr}
    attrs = {"shape": [out_features, x.shape[-1]], "block": list(values.shape[1:])}
    return native.bsr_linear(x, tensors, attrs, bias)


@cpu_bsr_linear.register_fake
def _(x, values, col_idx, row_ptr, out_features, bias=None):
    return x.new_empty((*x.shape[:-1], out_features))
