"""Quantizers: spec parsing, params / codes / dequantization against slow per-element loops written from
rtn.py's formulas, RTN error bounds (hypothesis), exact fp8 round trip, SparseGPT's column quantizer."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify.errors import UserError
from sparsify.quant import rtn
from sparsify.quant.spec import QuantParams, QuantSpec

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPECS = [QuantSpec("int8"), QuantSpec("int4", 32), QuantSpec("int4", 32, symmetric=False), QuantSpec("int4", None),
         QuantSpec("int4", 16, symmetric=False), QuantSpec("fp8")]


def _weight(out, inp, seed, dtype=torch.float32, density=0.5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g)  # rows of different ranges
    return torch.where(torch.rand(out, inp, generator=g) < density, w, 0.0).to(dtype)


def test_parse():
    assert QuantSpec.parse("none", None) is None
    w8a8 = QuantSpec.parse("w8a8", None)
    assert (w8a8.kind, w8a8.group_size, w8a8.activations) == ("int8", None, "int8")
    assert QuantSpec.parse("int4", None) == QuantSpec("int4", 128)
    assert QuantSpec.parse("int4", 32).group_size == 32 and QuantSpec.parse("int4", 0).group_size is None
    assert QuantSpec.parse("INT8", None) == QuantSpec("int8") and QuantSpec.parse("fp8", None) == QuantSpec("fp8")
    for bad in [("int3", None), ("int4", 48), ("int4", 256), ("int8", 64), ("fp8", 128)]:
        with pytest.raises(UserError):
            QuantSpec.parse(*bad)


def _slow_params(w, spec):
    """Per row and group, with plain Python loops: amax / qmax, or asymmetric (max - min) / 15 and zero."""
    out, inp = w.shape
    size = spec.group_size or inp
    qmax = {"int8": 127, "int4": 7, "fp8": 448}[spec.kind]
    scale, zero = torch.zeros(out, -(-inp // size)), torch.zeros(out, -(-inp // size), dtype=torch.uint8)
    for r in range(out):
        for gi, lo in enumerate(range(0, inp, size)):
            vals = w[r, lo:lo + size].float()
            if spec.symmetric:
                amax = max(abs(float(v)) for v in vals)
                scale[r, gi] = torch.tensor(amax) / qmax if amax > 0 else 1.0
            else:
                lo_v, hi_v = min(0.0, min(float(v) for v in vals)), max(0.0, max(float(v) for v in vals))
                s = (torch.tensor(hi_v) - torch.tensor(lo_v)) / 15
                scale[r, gi] = s if s > 0 else 1.0
                zero[r, gi] = int(min(max(round(-lo_v / float(scale[r, gi])), 0), 15))
    return scale, (zero if not spec.symmetric else None)


def _slow_codes(w, params):
    """Element by element: q = round(w / scale) (+ zero), clamped to the code range."""
    spec, out, inp = params.spec, *w.shape
    size = spec.group_size or inp
    codes = []
    for r in range(out):
        row = []
        for c in range(inp):
            s = params.scale[r, c // size]
            q = w[r, c].float() / s
            if spec.kind == "fp8":
                row.append(float(q.clamp(-448, 448).to(torch.float8_e4m3fn).float()))
            elif spec.kind == "int8":
                row.append(int(min(max(torch.round(q), -127), 127)))
            else:
                z = int(params.zero[r, c // size]) if params.zero is not None else 8
                row.append(int(min(max(torch.round(q) + z, 0), 15)))
        codes.append(row)
    return codes


def _slow_dequant(codes, params, dtype):
    """Element by element: ((code - zero) * scale) in float32, then cast."""
    spec, (out, inp) = params.spec, codes.shape
    size = spec.group_size or inp
    dq = torch.zeros(out, inp, dtype=dtype)
    for r in range(out):
        for c in range(inp):
            z = float(params.zero[r, c // size]) if params.zero is not None else (8.0 if spec.kind == "int4" else 0.0)
            dq[r, c] = ((codes[r, c].float() - z) * params.scale[r, c // size]).to(dtype)
    return dq


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_params_codes_dequant_match_slow_loops(spec):
    w = _weight(5, 40, seed=len(str(spec)))  # 40: a partial last group of 8 for group sizes 16 / 32
    w[0] = 0.0  # an all-zero row: scale 1
    params = rtn.compute_params(w, spec)
    scale, zero = _slow_params(w, spec)
    assert params.scale.dtype == torch.float32 and torch.equal(params.scale, scale)
    assert (params.zero is None) == (zero is None) and (zero is None or torch.equal(params.zero, zero))
    codes = rtn.quantize_codes(w, params)
    assert codes.dtype == {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}[spec.kind]
    assert codes.float().tolist() == _slow_codes(w, params)
    for dtype in DTYPES:
        assert torch.equal(rtn.dequantize(codes, params, dtype), _slow_dequant(codes, params, dtype))


@settings(max_examples=40, deadline=None)
@given(spec=st.sampled_from(SPECS), out=st.integers(1, 6), inp=st.integers(1, 70), seed=st.integers(0, 2**16),
       density=st.sampled_from([0.0, 0.5, 1.0]))
def test_error_bounds_and_zeros(spec, out, inp, seed, density):
    w = _weight(out, inp, seed, density=density)
    fq, params = rtn.fake_quantize(w, spec)
    size = spec.group_size or inp
    scale = params.scale.repeat_interleave(size, dim=1)[:, :inp]  # (out, in)
    err = (fq - w).abs()
    if spec.kind == "fp8":  # e4m3: 3 mantissa bits -> half a step is 1/16 relative; subnormal step 2^-9 scale
        assert bool((err <= w.abs() / 16 + scale * 2**-10 + 1e-7).all())
    else:
        assert bool((err <= scale / 2 * (1 + 1e-5)).all())
    zeros = w == 0
    assert bool((fq[zeros].view(torch.int32) == 0).all())  # pruned weights stay exactly +0.0
    assert torch.equal(rtn.snap(fq, params), fq)  # on the grid: idempotent


def test_fp8_round_trip_exact_on_representable_values():
    g = torch.Generator().manual_seed(0)
    codes = (torch.randn(4, 64, generator=g) * 50).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    codes[:, 0] = 448.0  # the row's amax: scale = amax / 448 = the power of two below exactly
    w = codes * torch.tensor([[2.0**-7], [2.0**-3], [1.0], [4.0]])  # (4, 64)
    fq, params = rtn.fake_quantize(w, QuantSpec("fp8"))
    assert torch.equal(fq, w) and params.scale.flatten().tolist() == [2.0**-7, 2.0**-3, 1.0, 4.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quantize_keeps_dtype_and_matches_dequant(dtype):
    w = _weight(6, 64, seed=3, dtype=dtype)
    fq, params = rtn.fake_quantize(w, QuantSpec("int4", 32, symmetric=False))
    assert fq.dtype == dtype and params.scale.shape == (6, 2) and params.zero.dtype == torch.uint8
    assert torch.equal(fq, rtn.dequantize(rtn.quantize_codes(w, params), params, dtype))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_column_quantizer(spec):
    w = _weight(7, 48, seed=9)
    quantize = rtn.column_quantizer(w, spec)
    ref = rtn.compute_params(w, spec)
    assert torch.equal(quantize.params.scale, ref.scale)
    drift = w + 0.01 * torch.randn(7, 48, generator=torch.Generator().manual_seed(1)) * (w != 0)  # OBS updates
    got = torch.stack([quantize(drift[:, c], c) for c in range(48)], dim=1)  # (out, in)
    assert got.dtype == torch.float32 and torch.equal(got, rtn.snap(drift, quantize.params))
    assert bool((got[w == 0].view(torch.int32) == 0).all())


def test_quant_params_attrs():
    zero = torch.zeros(2, 1, dtype=torch.uint8)
    params = QuantParams(QuantSpec("int4", None, symmetric=False), torch.ones(2, 1), zero)
    assert params.attrs(96) == {"quant": "int4", "group_size": 96, "symmetric": False}
    assert QuantParams(QuantSpec.parse("w8a8", None), torch.ones(2, 1)).attrs(8)["activations"] == "int8"
