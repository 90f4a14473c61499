"""W8A8 Triton kernel and activation quantizer (interpreter) against the reference's exact integer matmul.

The quantizer must agree with `quantize_act_ref` bit for bit (same division, round half to even).
The matmul accumulates in int32 exactly, so fp32 outputs agree to fp32 rounding of the epilogue
(1e-5 relative); fp16 / bf16 outputs to one / two ulps (2e-3 / 1.6e-2).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify.errors import UserError
from sparsify.kernels import reference as R
from sparsify.kernels.triton.w8a8 import quantize_activations, w8a8_linear

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 5), k=st.integers(1, 40), seed=st.integers(0, 999), static=st.sampled_from([None, 0.013]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_quantizer_bit_exact(tokens, k, seed, static, dtype):
    x = (torch.randn(tokens, k, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    q, s = quantize_activations(x, static)
    q_ref, s_ref = R.quantize_act_ref(x, static)
    assert q.dtype == torch.int8 and torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_quantizer_ties_zero_rows_and_slow_loop():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 127.0], [0.0] * 6, [1e3, -1e3, 3.0, 0.0, 1.0, -7.0]])
    q, s = quantize_activations(x)
    for t in range(3):  # per token: scale = max(amax / 127, 1e-8), code = round-half-even(x / scale)
        scale = max(max(abs(v) for v in x[t].tolist()) / 127, 1e-8)
        assert s[t].item() == pytest.approx(scale, rel=1e-6)
        for kk in range(6):
            assert int(q[t, kk]) == max(-127, min(127, round(x[t, kk].item() / s[t].item())))  # Python rounds half even
    q, s = quantize_activations(x, 1.0)  # static: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 1e3 clamps
    assert q[0, :5].tolist() == [0, 2, 2, 0, -2] and q[2, :2].tolist() == [127, -127] and bool((s == 1.0).all())


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("static", [None, 0.03], ids=["dynamic", "static"])
@pytest.mark.parametrize("tokens,out,inp", [(1, 33, 72), (3, 24, 40), (17, 33, 72)])
def test_w8a8_matches_integer_reference(n, m, static, tokens, out, inp):
    seed = tokens + inp + n
    w = R.random_nm_weight(out, inp, n, m, seed=seed, full=False)
    codes, meta, w_scale, _ = R.quant_pack_ref(w, n, m, "int8")
    g = torch.Generator().manual_seed(seed)
    x, bias = torch.randn(tokens, inp, generator=g), torch.randn(out, generator=g)
    got = w8a8_linear(x, codes, meta, w_scale, n, m, static, bias)
    want_ref = R.w8a8_linear_ref(x, codes, meta, w_scale, n, m, static, bias)
    torch.testing.assert_close(got, want_ref, **TOL[torch.float32])
    qx, sx = R.quantize_act_ref(x, static)  # and against codes x codes written out densely
    qw = R.nm_unpack_ref(codes, meta, n, m, (out, inp)).double()  # (out, in) integer weights
    want = (qx.double() @ qw.T) * sx.double()[:, None] * w_scale.double().view(1, -1) + bias.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w8a8_half_activations_and_batch_dims(dtype):
    w = R.random_nm_weight(24, 64, 2, 4, seed=2)
    codes, meta, w_scale, _ = R.quant_pack_ref(w, 2, 4, "int8")
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = w8a8_linear(x, codes, meta, w_scale, 2, 4)
    assert got.dtype == dtype and got.shape == (2, 3, 24)
    torch.testing.assert_close(got, R.w8a8_linear_ref(x, codes, meta, w_scale, 2, 4), **TOL[dtype])


def test_w8a8_split_k():
    w = R.random_nm_weight(40, 128, 2, 4, seed=4)
    codes, meta, w_scale, _ = R.quant_pack_ref(w, 2, 4, "int8")
    x, bias = torch.randn(5, 128), torch.randn(40)
    got = w8a8_linear(x, codes, meta, w_scale, 2, 4, None, bias,
                      config={"BLOCK_T": 16, "BLOCK_O": 32, "BLOCK_K": 32, "SPLIT_K": 3})
    torch.testing.assert_close(got, R.w8a8_linear_ref(x, codes, meta, w_scale, 2, 4, None, bias), rtol=1e-4, atol=1e-4)


def test_w8a8_errors_name_the_fix():
    w = R.random_nm_weight(8, 32, 2, 4, seed=0)
    codes, meta, w_scale, _ = R.quant_pack_ref(w, 2, 4, "int8")
    with pytest.raises(UserError, match="one weight scale per output channel"):
        w8a8_linear(torch.randn(2, 32), codes, meta, w_scale[:4], 2, 4)
    with pytest.raises(UserError, match="int8 values"):
        w8a8_linear(torch.randn(2, 32), codes.float(), meta, w_scale, 2, 4)
    with pytest.raises(UserError, match="2-D"):
        quantize_activations(torch.randn(2, 3, 4))
