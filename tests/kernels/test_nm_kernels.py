"""Triton N:M kernels against kernels/reference.py under TRITON_INTERPRET=1, awkward shapes.

Tolerances: fp32 1e-4 relative; fp16 one output ulp (the kernel accumulates in fp32 and rounds once);
bf16 two ulps (the interpreter truncates fp32 -> bf16 instead of rounding).
"""
from __future__ import annotations

import pytest
import torch

from sparsify import formats
from sparsify.kernels import kernel_name, linear, reference
from sparsify.kernels.triton.nm_matmul import nm_linear
from sparsify.kernels.triton.w8a8 import quantize_activations, w8a8_linear
from sparsify.quant import rtn
from sparsify.quant.spec import QuantSpec

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def _weight(out, inp, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    keep = (torch.rand(out, inp // m, m, generator=g).argsort(-1) < n).view(out, inp)
    keep &= torch.rand(out, inp, generator=g) < 0.9  # some groups hold fewer than n
    return torch.where(keep, w, 0.0)


def test_nm_unpack_ref_matches_slow_loop_and_formats():
    w = _weight(5, 24, 2, 4, seed=1)
    t, a = formats.pack("nm", w, n=2, m=4)
    ref = reference.nm_unpack_ref(t["values"], t["meta"], 2, 4, a["shape"], a["bits"])
    slow = torch.zeros(5, 24)
    for r in range(5):
        for j in range(t["values"].shape[1]):
            byte = int(t["meta"][r, (j * 2) // 8])
            slow[r, (j // 2) * 4 + ((byte >> ((j * 2) % 8)) & 3)] = t["values"][r, j]
    assert torch.equal(ref, slow) and torch.equal(ref, w)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_float_values(n, m, dtype, tokens):
    out, inp = 33, 72  # neither a multiple of the tiles
    w = _weight(out, inp, n, m, seed=tokens).to(dtype)
    t, a = formats.pack("nm", w, n=n, m=m)
    x = torch.randn(tokens, inp).to(dtype)
    bias = torch.randn(out).to(dtype)
    got = nm_linear(x, t["values"], t["meta"], n, m, a["bits"], out, bias=bias)
    dense = reference.nm_unpack_ref(t["values"], t["meta"], n, m, a["shape"], a["bits"])
    want = (x.float() @ dense.float().T + bias.float()).to(dtype)
    assert got.dtype == dtype and got.shape == (tokens, out)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("int4", 16), QuantSpec("int4", 32, symmetric=False),
                                  QuantSpec("int4", None), QuantSpec("fp8")], ids=str)
@pytest.mark.parametrize("tokens", [1, 17])
def test_weight_only_quantized(n, m, spec, tokens):
    out, inp = 24, 96
    wq, params = rtn.fake_quantize(_weight(out, inp, n, m, seed=3), spec)
    t, a = formats.pack("nm", wq, n=n, m=m, quant=params)
    x = torch.randn(2, (tokens + 1) // 2, inp)[:, :tokens] if tokens > 1 else torch.randn(1, inp)  # (..., in)
    got = nm_linear(x, t["values"], t["meta"], n, m, a["bits"], out, quant=a["quant"], scale=t["scale"],
                    zero=t.get("zero"), group_size=a["group_size"])
    torch.testing.assert_close(got, reference.linear(x, "nm", t, a), **TOL[torch.float32])


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("static", [None, 0.02])
def test_w8a8(n, m, static):
    out, inp, tokens = 33, 72, 17
    wq, params = rtn.fake_quantize(_weight(out, inp, n, m, seed=5), QuantSpec("int8"))
    t, a = formats.pack("nm", wq, n=n, m=m, quant=params)
    x = torch.randn(tokens, inp)
    got = w8a8_linear(x, t["values"], t["meta"], t["scale"], n, m, a["bits"], act_scale=static)
    qx, sx = quantize_activations(x, static)
    codes = torch.round(wq.double() / params.scale.double())  # exact integer weights
    want = (qx.double() @ codes.T) * sx.double()[:, None] * params.scale.double().view(1, -1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    simulated = reference.quantize_activations_ref(x, static) @ wq.T  # the CPU reference's numerics
    torch.testing.assert_close(got, simulated, rtol=1e-4, atol=1e-4)


def test_dispatch_paths(monkeypatch):
    x = torch.randn(3, 8)
    nm_attrs = {"n": 2, "m": 4, "bits": 2, "shape": [4, 8], "dtype": "float32"}
    assert kernel_name(x, "nm", nm_attrs) == "reference"  # CPU, auto
    monkeypatch.setenv("SPARSIFY_KERNELS", "triton")
    assert kernel_name(x, "nm", nm_attrs) == "triton-nm"
    assert kernel_name(x, "nm", {**nm_attrs, "quant": "int8", "activations": "int8"}) == "triton-w8a8"
    assert kernel_name(x, "bitmask", {"shape": [4, 8]}) == "reference"
    w = _weight(4, 8, 2, 4, seed=0)
    t, a = formats.pack("nm", w, n=2, m=4)
    torch.testing.assert_close(linear(x, "nm", t, a), x @ w.T)
    monkeypatch.setenv("SPARSIFY_KERNELS", "auto")

    class FakeCuda:  # only the device check and shape are consulted
        device = torch.device("cuda")
        shape = (3, 8)
        dtype = torch.float16

        @staticmethod
        def numel():
            return 3 * 8

    assert kernel_name(FakeCuda, "nm", nm_attrs) == "triton-nm"
    FakeCuda.shape, FakeCuda.numel = (4096, 8), staticmethod(lambda: 4096 * 8)
    assert kernel_name(FakeCuda, "nm", nm_attrs) == "semi-structured"
    assert kernel_name(FakeCuda, "nm", {**nm_attrs, "quant": "int8"}) == "dense-cached"
