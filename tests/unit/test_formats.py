"""Packed formats: bit-exact round trips (hypothesis), byte sizes from the spec, meta layout vs a slow loop,
quantized values (random codes + scales -> dequantize -> pack -> unpack), errors."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify import formats
from sparsify.config import Scheme
from sparsify.errors import UserError
from sparsify.formats import nbytes, nm_mask_ok
from sparsify.quant import rtn
from sparsify.quant.spec import QuantParams, QuantSpec

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INTS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
DENSITY = st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)


def _bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INTS[a.dtype]), b.view(INTS[b.dtype]))


def _index_bits(m):
    return 2 if m <= 4 else 4 if m <= 16 else 8


def _nm_keep(out, groups, n, m, fill, g):
    """(out, groups*m) bool: n random positions per group, each then dropped with probability 1 - fill."""
    keep = torch.rand(out, groups, m, generator=g).argsort(-1) < n  # exactly n per group
    return (keep & (torch.rand(out, groups, m, generator=g) < fill)).view(out, groups * m)


def _masked(w, keep, g):
    """+0.0 where not kept; some kept entries set to -0.0 (a kept value: its bit pattern is non-zero)."""
    w = torch.where(torch.rand(w.shape, generator=g) < 0.1, -torch.zeros((), dtype=w.dtype), w)
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype))


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 9), groups=st.integers(1, 6), m=st.sampled_from([2, 4, 8, 16]), data=st.data(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), fill=DENSITY)
def test_nm_round_trip_and_size(out, groups, m, data, dtype, seed, fill):
    n = data.draw(st.integers(1, m - 1))
    g = torch.Generator().manual_seed(seed)
    w = _masked(torch.randn(out, groups * m, generator=g).to(dtype), _nm_keep(out, groups, n, m, fill, g), g)
    tensors, attrs = formats.pack("nm", w, n=n, m=m)
    assert _bits_equal(formats.unpack("nm", tensors, attrs), w)
    assert attrs == {"n": n, "m": m, "bits": _index_bits(m), "shape": [out, groups * m], "dtype": str(dtype)[6:]}
    expected = out * groups * n * w.element_size() + out * math.ceil(groups * n * _index_bits(m) / 8)
    assert nbytes(tensors) == expected == sum(t.numel() * t.element_size() for t in tensors.values())
    assert nm_mask_ok(w, n, m)


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 9), inp=st.integers(1, 30), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       density=DENSITY)
def test_bitmask_round_trip_and_size(out, inp, dtype, seed, density):
    g = torch.Generator().manual_seed(seed)
    w = _masked(torch.randn(out, inp, generator=g).to(dtype), torch.rand(out, inp, generator=g) < density, g)
    tensors, attrs = formats.pack("bitmask", w)
    assert _bits_equal(formats.unpack("bitmask", tensors, attrs), w)
    nnz = sum(1 for v in w.view(INTS[dtype]).flatten().tolist() if v != 0)  # non-zero bit patterns
    assert nbytes(tensors) == nnz * w.element_size() + out * math.ceil(inp / 8) + (out + 1) * 4
    assert tensors["row_ptr"].tolist() == [0] + torch.cumsum((w.view(INTS[dtype]) != 0).sum(1), 0).tolist()


def test_dense_passthrough():
    w = torch.randn(3, 5, dtype=torch.bfloat16)
    tensors, attrs = formats.pack("dense", w)
    assert attrs == {"shape": [3, 5], "dtype": "bfloat16"} and _bits_equal(formats.unpack("dense", tensors, attrs), w)


def test_negative_zero_survives_bitmask():
    w = torch.tensor([[0.0, -0.0, 1.0]])
    t, a = formats.pack("bitmask", w)
    assert t["values"].numel() == 2 and _bits_equal(formats.unpack("bitmask", t, a), w)


def _slow_meta(w, n, m):
    """Expected meta bytes built element by element from the layout in nm.py's docstring."""
    b, bits = _index_bits(m), w.view(INTS[w.dtype])  # -0.0 counts as non-zero
    rows = []
    for r in range(w.shape[0]):
        idx = []
        for g in range(w.shape[1] // m):
            nz = [p for p in range(m) if int(bits[r, g * m + p]) != 0]
            zeros = [p for p in range(m) if p not in nz]
            idx += sorted(nz + zeros[: n - len(nz)])
        data = [0] * math.ceil(len(idx) * b / 8)
        for j, p in enumerate(idx):
            data[(j * b) // 8] |= p << ((j * b) % 8)
        rows.append(data)
    return torch.tensor(rows, dtype=torch.uint8)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 2), (4, 8), (3, 8), (5, 16), (3, 32)])
def test_meta_layout_matches_slow_loop(n, m):
    g = torch.Generator().manual_seed(n * 100 + m)
    w = _masked(torch.randn(5, 7 * m, generator=g), _nm_keep(5, 7, n, m, 0.7, g), g)
    tensors, attrs = formats.pack("nm", w, n=n, m=m)
    assert torch.equal(tensors["meta"], _slow_meta(w, n, m)) and attrs["bits"] == _index_bits(m)
    assert _bits_equal(formats.unpack("nm", tensors, attrs), w)


def test_24_fp16_ratio_is_exact():
    g = torch.Generator().manual_seed(1)
    w = torch.where(_nm_keep(64, 32, 2, 4, 1.0, g), torch.randn(64, 128, generator=g), 0.0).half()
    assert nbytes(formats.pack("nm", w, n=2, m=4)[0]) / (w.numel() * 2) == 0.5625


def test_errors_and_format_for():
    with pytest.raises(ValueError, match="not 2:4"):
        formats.pack("nm", torch.ones(2, 8), n=2, m=4)
    with pytest.raises(ValueError, match=r"\[2, 6\]"):
        formats.pack("nm", torch.zeros(2, 6), n=2, m=4)
    with pytest.raises(UserError, match="bitmask, bsr, dense, nm"):
        formats.pack("csr9", torch.zeros(2, 4))
    with pytest.raises(UserError, match="bitmask"):
        formats.unpack("csr9", {}, {})
    with pytest.raises(ValueError, match="multiple of M"):
        params = rtn.compute_params(torch.zeros(2, 32), QuantSpec("int4", 8))
        formats.pack("nm", torch.zeros(2, 32), n=2, m=16, quant=params)
    assert formats.format_for(Scheme.parse("4:8")) == ("nm", {"n": 4, "m": 8})
    assert formats.format_for(Scheme.parse("unstructured")) == ("bitmask", {})
    assert formats.format_for(Scheme.parse("dense")) == ("dense", {})
    assert formats.format_for(Scheme.parse("block:4x8")) == ("bsr", {"block": [4, 8]})
    with pytest.raises(ValueError, match="unquantized"):
        formats.pack("bsr", torch.zeros(4, 8), block=(4, 8), quant=rtn.compute_params(torch.ones(4, 8), QuantSpec("int8")))


def _random_quantized(out, inp, spec, dtype, keep, g):
    """Random codes and scales -> W = dequantize(codes), zeroed where not ``keep`` (the packer's input)."""
    ngroups = -(-inp // (spec.group_size or inp))
    scale = torch.rand(out, ngroups, generator=g) * 0.5 + 0.01  # (out, ngroups)
    zero = torch.randint(0, 16, (out, ngroups), generator=g).to(torch.uint8) if not spec.symmetric else None
    if spec.kind == "int8":
        codes = torch.randint(-127, 128, (out, inp), generator=g).to(torch.int8)
    elif spec.kind == "int4":
        codes = torch.randint(0, 16, (out, inp), generator=g).to(torch.uint8)
    else:
        codes = (torch.randn(out, inp, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    params = QuantParams(spec, scale, zero)
    w = rtn.dequantize(codes, params, dtype)
    return torch.where(keep, w, torch.zeros((), dtype=dtype)), params


QSPECS = [QuantSpec("int8"), QuantSpec("int4", 16), QuantSpec("int4", 32, symmetric=False),
          QuantSpec("int4", None, symmetric=False), QuantSpec("int4", None), QuantSpec("fp8")]


@settings(max_examples=80, deadline=None)
@given(spec=st.sampled_from(QSPECS), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       nm=st.sampled_from([(2, 4), (4, 8), None]), out=st.integers(1, 6), groups=st.integers(1, 5), density=DENSITY)
def test_quantized_round_trip_and_size(spec, dtype, seed, nm, out, groups, density):
    inp = groups * 16
    g = torch.Generator().manual_seed(seed)
    keep = _nm_keep(out, inp // nm[1], *nm, density, g) if nm else torch.rand(out, inp, generator=g) < density
    w, params = _random_quantized(out, inp, spec, dtype, keep, g)
    name, opts = ("nm", {"n": nm[0], "m": nm[1]}) if nm else ("bitmask", {})
    tensors, attrs = formats.pack(name, w, quant=params, **opts)
    assert _bits_equal(formats.unpack(name, tensors, attrs), w)
    size, ngroups = spec.group_size or inp, params.scale.shape[1]
    assert attrs["quant"] == spec.kind and attrs["group_size"] == size and attrs["symmetric"] == spec.symmetric
    kept = out * inp * nm[0] // nm[1] if nm else int((w != 0).sum())
    per_value = {"int8": 1.0, "fp8": 1.0, "int4": 0.5}[spec.kind]
    if nm:
        expected = out * math.ceil(kept // out * per_value) + out * math.ceil(kept // out * _index_bits(nm[1]) / 8)
    else:
        expected = math.ceil(kept * per_value) + out * math.ceil(inp / 8) + (out + 1) * 4
    expected += out * ngroups * 4 + (out * ngroups if not spec.symmetric else 0)  # scale (+ zero)
    assert nbytes(tensors) == expected == sum(t.numel() * t.element_size() for t in tensors.values())


def test_int4_nibble_order():
    """Value j sits in byte j // 2, low nibble for even j (bitmask: the flat list of kept values)."""
    spec = QuantSpec("int4", None)
    params = QuantParams(spec, torch.ones(1, 1))
    w = rtn.dequantize(torch.tensor([[9, 10, 11]], dtype=torch.uint8), params, torch.float32)  # 1., 2., 3.
    tensors, _ = formats.pack("bitmask", w, quant=params)
    assert tensors["values"].tolist() == [9 | (10 << 4), 11]
    tensors, _ = formats.pack("nm", torch.cat([w, torch.zeros(1, 1)], 1), n=3, m=4, quant=params)
    assert tensors["values"].tolist() == [[9 | (10 << 4), 11]]


@pytest.mark.parametrize("spec,limit", [(QuantSpec("int8"), 0.33), (QuantSpec("int4", 128, symmetric=False), 0.21)])
def test_quantized_24_size_targets(spec, limit):
    g = torch.Generator().manual_seed(0)
    w = torch.where(_nm_keep(1536, 144, 2, 4, 1.0, g), torch.randn(1536, 576, generator=g), 0.0)
    wq, params = rtn.fake_quantize(w, spec)
    tensors, attrs = formats.pack("nm", wq, n=2, m=4, quant=params)
    assert nbytes(tensors) / (w.numel() * 2) <= limit
    assert _bits_equal(formats.unpack("nm", tensors, attrs), wq)
