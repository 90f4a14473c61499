"""Round-to-nearest quantization with ONE dequantization formula, shared by the quantizers and the
packed formats so that pack -> unpack reproduces a fake-quantized weight bit for bit.

    dequant = ((code - zero) * scale) in float32, then cast to the weight dtype
    int8: code in [-127, 127], zero 0, scale = amax / 127
    int4: code u in [0, 15]; symmetric: zero 8, scale = amax / 7 (q in [-8, 7])
          asymmetric: scale = (max - min) / 15 with min <= 0 <= max, zero = round(-min / scale) in
          [0, 15], so 0.0 is a grid point and a pruned weight dequantizes to exactly 0.0
    fp8:  code float8_e4m3fn, zero 0, scale = amax / 448
Scales are per (output row, group of ``group_size`` input columns); a group whose values are all
zero gets scale 1. A kept weight that rounds to 0.0 becomes +0.0, i.e. it is pruned too (the packers
only keep non-zero bit patterns).

Public: `compute_params`, `quantize_codes`, `dequantize`, `fake_quantize`, `column_quantizer`;
`encode` / `decode` / `expand` are the same arithmetic on per-element scales (formats, distillation).
"""
from __future__ import annotations

import torch

from sparsify.quant.spec import QuantParams, QuantSpec

QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}


def _grouped(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """(out, in) -> (out, ngroups, size) float32, the last group zero-padded."""
    out, inp = weight.shape
    size, ng = spec.groups(inp)
    w = weight.float()
    if ng * size != inp:
        w = torch.nn.functional.pad(w, (0, ng * size - inp))
    return w.view(out, ng, size)


def compute_params(weight: torch.Tensor, spec: QuantSpec) -> QuantParams:
    """Scales (and zero points) for a dense (out, in) weight."""
    g = _grouped(weight, spec)  # (out, ng, size)
    if spec.kind == "int4" and not spec.symmetric:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)  # (out, ng)
        scale = (hi - lo) / 15
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp(0, 15).to(torch.uint8)
        return QuantParams(spec, scale.contiguous(), zero.contiguous())
    amax = g.abs().amax(-1)  # (out, ng)
    scale = torch.where(amax > 0, amax / QMAX[spec.kind], torch.ones_like(amax))
    return QuantParams(spec, scale.contiguous(), None)


def expand(scale: torch.Tensor, zero: torch.Tensor | None, kind: str, group_size: int,
           rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element (scale, zero) float32 for elements at (rows, cols) of the dense weight."""
    grp = cols // group_size
    s = scale[rows, grp]
    z = zero[rows, grp].float() if zero is not None else torch.full_like(s, 8.0 if kind == "int4" else 0.0)
    return s, z


def expand_params(params: QuantParams, rows: torch.Tensor, cols: torch.Tensor, in_features: int):
    """`expand` with the scales, zero points and group size of ``params``."""
    return expand(params.scale, params.zero, params.spec.kind, params.spec.groups(in_features)[0], rows, cols)


def encode(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, kind: str) -> torch.Tensor:
    """Codes of ``values`` (any shape) given per-element scale / zero."""
    q = values.float() / scale
    if kind == "fp8":
        return q.clamp(-448, 448).to(torch.float8_e4m3fn)
    if kind == "int8":
        return torch.round(q).clamp(-127, 127).to(torch.int8)
    return (torch.round(q) + zero).clamp(0, 15).to(torch.uint8)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The shared dequantization formula; -0.0 is normalised to +0.0."""
    dq = ((codes.float() - zero) * scale).to(dtype)
    return torch.where(dq == 0, torch.zeros((), dtype=dtype), dq)


def dense_params(params: QuantParams, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) float32 (out, in): the params of every dense column (column c is in group c // size)."""
    size = params.spec.groups(in_features)[0]
    scale = params.scale.float().repeat_interleave(size, dim=1)[:, :in_features]  # (out, in)
    if params.zero is not None:
        zero = params.zero.float().repeat_interleave(size, dim=1)[:, :in_features]  # (out, in)
    else:
        zero = torch.full_like(scale, 8.0 if params.spec.kind == "int4" else 0.0)
    return scale, zero


def quantize_codes(weight: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """Dense (out, in) codes of ``weight``: int8 (int8), uint8 in [0, 15] (int4), float8_e4m3fn (fp8)."""
    scale, zero = dense_params(params, weight.shape[1])
    return encode(weight, scale, zero, params.spec.kind)


def dequantize(codes: torch.Tensor, params: QuantParams, dtype: torch.dtype) -> torch.Tensor:
    """Dense (out, in) codes -> values in ``dtype`` with the shared formula (see `decode`)."""
    scale, zero = dense_params(params, codes.shape[1])
    return decode(codes, scale, zero, dtype)


def snap(weight: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """dequantize(quantize(weight)) in weight's dtype: the fake-quantized weight."""
    return dequantize(quantize_codes(weight, params), params, weight.dtype)


def fake_quantize(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, QuantParams]:
    """Round-to-nearest after pruning: (fake-quantized weight, its params)."""
    params = compute_params(weight, spec)
    return snap(weight, params), params


class ColumnQuantizer:
    """SparseGPT's joint-quantization hook: scales fixed up front from the weight ("static groups",
    as GPTQ's option of that name), then ``quantizer(w, c)`` rounds column ``c`` (out,) and returns it
    in float32 (zeros stay +0.0). ``.params`` holds the scales for the final snap and the packer."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec):
        self.params = compute_params(weight, spec)
        self.size = spec.groups(weight.shape[1])[0]

    def __call__(self, w: torch.Tensor, c: int) -> torch.Tensor:
        p, g = self.params, c // self.size
        scale = p.scale[:, g].to(w.device)  # (out,)
        zero = (p.zero[:, g].float() if p.zero is not None else
                torch.full_like(scale, 8.0 if p.spec.kind == "int4" else 0.0)).to(w.device)
        return decode(encode(w, scale, zero, p.spec.kind), scale, zero, torch.float32)


def column_quantizer(weight: torch.Tensor, spec: QuantSpec) -> ColumnQuantizer:
    return ColumnQuantizer(weight, spec)
