"""Packed formats: bit-exact round trips (hypothesis), byte sizes from the spec, layout vs a slow loop."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify import formats
from sparsify.errors import UserError
from sparsify.formats import nbytes, nm_mask_ok
from sparsify.quant import rtn
from sparsify.quant.spec import QuantParams, QuantSpec

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INTS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INTS[a.dtype]), b.view(INTS[b.dtype]))


def _nm_weight(out, groups, n, m, dtype, seed, fill):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, groups * m, generator=g).to(dtype)
    keep = torch.rand(out, groups, m, generator=g).argsort(-1) < n  # exactly n per group
    keep &= torch.rand(out, groups, m, generator=g) < fill  # some groups with fewer
    return torch.where(keep.view_as(w), w, torch.zeros((), dtype=dtype))


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 9), groups=st.integers(1, 6), m=st.sampled_from([2, 4, 8, 16]), data=st.data(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), fill=st.sampled_from([0.0, 0.5, 1.0]))
def test_nm_round_trip_and_size(out, groups, m, data, dtype, seed, fill):
    n = data.draw(st.integers(1, m - 1))
    w = _nm_weight(out, groups, n, m, dtype, seed, fill)
    tensors, attrs = formats.pack("nm", w, n=n, m=m)
    assert _bits_equal(formats.unpack("nm", tensors, attrs), w)
    b = 2 if m <= 4 else 4
    expected = out * groups * n * w.element_size() + out * math.ceil(groups * n * b / 8)
    assert nbytes(tensors) == expected == sum(t.numel() * t.element_size() for t in tensors.values())
    assert nm_mask_ok(w, n, m)


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 9), inp=st.integers(1, 30), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       density=st.sampled_from([0.0, 0.3, 1.0]))
def test_bitmask_round_trip_and_size(out, inp, dtype, seed, density):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g).to(dtype)
    w = torch.where(torch.rand(out, inp, generator=g) < density, w, torch.zeros((), dtype=dtype))
    tensors, attrs = formats.pack("bitmask", w)
    assert _bits_equal(formats.unpack("bitmask", tensors, attrs), w)
    nnz = int((w != 0).sum())
    assert nbytes(tensors) == nnz * w.element_size() + out * math.ceil(inp / 8) + (out + 1) * 4


def test_negative_zero_survives_bitmask():
    w = torch.tensor([[0.0, -0.0, 1.0]])
    t, a = formats.pack("bitmask", w)
    assert t["values"].numel() == 2 and _bits_equal(formats.unpack("bitmask", t, a), w)


def _slow_meta(w, n, m):
    """Expected meta bytes built element by element from the layout in nm.py's docstring."""
    b = 2 if m <= 4 else 4
    rows = []
    for r in range(w.shape[0]):
        idx = []
        for g in range(w.shape[1] // m):
            nz = [p for p in range(m) if w[r, g * m + p] != 0]
            zeros = [p for p in range(m) if p not in nz]
            idx += sorted(nz + zeros[: n - len(nz)])
        data = [0] * math.ceil(len(idx) * b / 8)
        for j, p in enumerate(idx):
            data[(j * b) // 8] |= p << ((j * b) % 8)
        rows.append(data)
    return torch.tensor(rows, dtype=torch.uint8)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_meta_layout_matches_slow_loop(n, m):
    w = _nm_weight(5, 7, n, m, torch.float32, seed=3, fill=0.7)
    assert torch.equal(formats.pack("nm", w, n=n, m=m)[0]["meta"], _slow_meta(w, n, m))


def test_24_fp16_ratio_is_exact():
    w = _nm_weight(64, 32, 2, 4, torch.float16, seed=1, fill=1.0)
    assert nbytes(formats.pack("nm", w, n=2, m=4)[0]) / (w.numel() * 2) == 0.5625


def test_nm_errors():
    with pytest.raises(ValueError, match="not 2:4"):
        formats.pack("nm", torch.ones(2, 8), n=2, m=4)
    with pytest.raises(ValueError, match="divisible"):
        formats.pack("nm", torch.zeros(2, 6), n=2, m=4)
    with pytest.raises(UserError, match="bitmask"):
        formats.pack("csr9", torch.zeros(2, 4))


def _quantized_weight(out, inp, spec, dtype, seed, keep):
    """Random codes and scales -> the fake-quantized dense weight (the pruner -> packer handoff)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * keep(out, inp, g)
    params = rtn.compute_params(w.to(dtype), spec)
    return rtn.snap(w.to(dtype), params), params


QSPECS = [QuantSpec("int8"), QuantSpec("int4", 8), QuantSpec("int4", 16, symmetric=False), QuantSpec("int4", None),
          QuantSpec("fp8")]


@settings(max_examples=40, deadline=None)
@given(spec=st.sampled_from(QSPECS), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       nm=st.sampled_from([(2, 4), (4, 8), None]), out=st.integers(1, 6), groups=st.integers(1, 5))
def test_quantized_round_trip(spec, dtype, seed, nm, out, groups):
    inp = groups * 16
    if nm:
        n, m = nm
        keep = lambda o, i, g: (torch.rand(o, i // m, m, generator=g).argsort(-1) < n).view(o, i).float()  # noqa: E731
    else:
        keep = lambda o, i, g: (torch.rand(o, i, generator=g) < 0.5).float()  # noqa: E731
    w, params = _quantized_weight(out, inp, spec, dtype, seed, keep)
    name, opts = ("nm", {"n": nm[0], "m": nm[1]}) if nm else ("bitmask", {})
    tensors, attrs = formats.pack(name, w, quant=params, **opts)
    assert _bits_equal(formats.unpack(name, tensors, attrs), w)
    assert attrs["quant"] == spec.kind and tensors["scale"].shape == params.scale.shape
    kept = int((w != 0).sum()) if not nm else out * inp * nm[0] // nm[1]
    vbytes = {"int8": kept, "fp8": kept, "int4": None}[spec.kind]
    if vbytes is not None:
        assert tensors["values"].numel() * tensors["values"].element_size() == vbytes


@pytest.mark.parametrize("spec,limit", [(QuantSpec("int8"), 0.33), (QuantSpec("int4", 128, symmetric=False), 0.21)])
def test_quantized_24_size_targets(spec, limit):
    w = _nm_weight(1536, 576 // 4, 2, 4, torch.float32, seed=0, fill=1.0)
    wq, params = rtn.fake_quantize(w, spec)
    tensors, _ = formats.pack("nm", wq, n=2, m=4, quant=params)
    assert nbytes(tensors) / (w.numel() * 2) <= limit
