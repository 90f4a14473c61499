"""Weight-only quantized N:M Triton kernel (int8, int4 sym/asym, fp8; interpreter) against the reference,
and the reference's dequantization against a slow loop written from the layout spec.

Tolerances: fp32 x 1e-4 relative (both dequantize in fp32, then fp32 accumulation); fp16 x 2e-3 and
bf16 x 1.6e-2 (one / two output ulps: the kernel casts to x's dtype once at the end).
"""
import pytest
import torch

from sparsify.errors import UserError
from sparsify.kernels import reference as R
from sparsify.kernels.triton.nm_matmul_wq import nm_linear_wq

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
QUANTS = [("int8", None, True), ("int4", 32, True), ("int4", 32, False), ("int4", None, True), ("int4", None, False),
          ("fp8", None, True)]


def slow_dequant(codes, scale, zero, n, m, quant, group_size, k):
    """Spec, element by element: value j in group ((j // N) * M) // group_size."""
    out = torch.zeros(codes.shape[0], k)
    for r in range(codes.shape[0]):
        for j in range(k):
            c = (int(codes[r, j // 2]) >> (4 * (j % 2))) & 15 if quant == "int4" else float(codes[r, j].float())
            grp = ((j // n) * m) // group_size
            z = float(zero[r, grp]) if zero is not None else 8.0 if quant == "int4" else 0.0
            out[r, j] = (c - z) * float(scale[r, grp])
    return out


def packed(out, inp, n, m, quant, gs, sym, seed):
    w = R.random_nm_weight(out, inp, n, m, seed=seed, full=False)
    return w, R.quant_pack_ref(w, n, m, quant, gs, sym)


@pytest.mark.parametrize("quant,gs,sym", QUANTS, ids=lambda v: str(v))
def test_dequant_ref_matches_slow_loop_and_weight(quant, gs, sym):
    n, m, out, inp = 2, 4, 5, 64
    w, (codes, meta, scale, zero) = packed(out, inp, n, m, quant, gs, sym, seed=11)
    k = inp // m * n
    deq = R.dequant_values_ref(codes, scale, zero, n, m, quant, gs or inp, k)  # (out, k)
    assert torch.equal(deq, slow_dequant(codes, scale, zero, n, m, quant, gs or inp, k))
    dense = R.nm_unpack_ref(deq, meta, n, m, (out, inp))
    step = scale.repeat_interleave(gs or inp, dim=1)  # (out, in) scale of each column
    bound = step / 2 + 1e-6 if quant != "fp8" else w.abs() / 8 + 1e-6  # rounding error of RTN / e4m3
    assert bool(((dense - w).abs() <= bound).all())


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("quant,gs,sym", QUANTS, ids=lambda v: str(v))
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_wq_matches_reference(n, m, quant, gs, sym, tokens):
    out, inp = 33, 96
    seed = tokens + 10 * n + len(quant)
    _, (codes, meta, scale, zero) = packed(out, inp, n, m, quant, gs, sym, seed)
    g = torch.Generator().manual_seed(seed)
    x, bias = torch.randn(tokens, inp, generator=g), torch.randn(out, generator=g)
    got = nm_linear_wq(x, codes, meta, scale, zero, n, m, quant, gs or inp, bias)
    deq = R.nm_unpack_ref(R.dequant_values_ref(codes, scale, zero, n, m, quant, gs or inp, inp // m * n), meta, n, m,
                          (out, inp))
    torch.testing.assert_close(got, x @ deq.T + bias, **TOL[torch.float32])  # dense matmul of the dequantized W
    torch.testing.assert_close(got, R.nm_linear_wq_ref(x, codes, meta, scale, zero, n, m, quant, gs or inp, bias),
                               **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant,gs,sym", [("int8", None, True), ("int4", 32, False)], ids=lambda v: str(v))
def test_wq_half_activations(dtype, quant, gs, sym):
    out, inp, tokens = 24, 72, 3
    _, (codes, meta, scale, zero) = packed(out, inp, 2, 4, quant, gs, sym, seed=5)
    x = torch.randn(tokens, inp, generator=torch.Generator().manual_seed(5)).to(dtype)
    got = nm_linear_wq(x, codes, meta, scale, zero, 2, 4, quant, gs or inp)
    assert got.dtype == dtype
    torch.testing.assert_close(got, R.nm_linear_wq_ref(x, codes, meta, scale, zero, 2, 4, quant, gs or inp),
                               **TOL[dtype])


def test_wq_split_k_and_batch_dims():
    _, (codes, meta, scale, zero) = packed(40, 128, 2, 4, "int4", 32, False, seed=9)
    x = torch.randn(2, 5, 128)
    got = nm_linear_wq(x, codes, meta, scale, zero, 2, 4, "int4", 32,
                       config={"BLOCK_T": 16, "BLOCK_O": 32, "BLOCK_K": 32, "SPLIT_K": 2})
    torch.testing.assert_close(got, R.nm_linear_wq_ref(x, codes, meta, scale, zero, 2, 4, "int4", 32),
                               **TOL[torch.float32])


def test_wq_errors_name_the_fix():
    _, (codes, meta, scale, zero) = packed(8, 64, 2, 4, "int4", 32, False, seed=0)
    x = torch.randn(2, 64)
    with pytest.raises(UserError, match="not one of"):
        nm_linear_wq(x, codes, meta, scale, zero, 2, 4, "int3", 32)
    with pytest.raises(UserError, match="scale must be"):
        nm_linear_wq(x, codes, meta, scale, zero, 2, 4, "int4", 16)
    with pytest.raises(UserError, match="zero points"):
        nm_linear_wq(x, codes, meta, scale, zero.to(torch.int32), 2, 4, "int4", 32)
    with pytest.raises(UserError, match="int8 codes must be"):
        nm_linear_wq(x, R.int4_unpack_ref(codes, 32), meta, scale, None, 2, 4, "int8", 32)  # uint8, not int8
