"""Float N:M Triton kernel (interpreter) against dense matmul, and the reference packer/unpacker
against slow loops written straight from the layout spec.

Tolerances: fp32 1e-4 relative (fp32 accumulation, order differs); fp16 2e-3 (kernel and oracle
both round the fp32 sum once: at most one fp16 ulp, 2**-10); bf16 1.6e-2 (two bf16 ulps, 2**-7:
the interpreter truncates fp32 -> bf16 instead of rounding).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify.errors import UserError
from sparsify.kernels import reference as R
from sparsify.kernels.triton.nm_matmul import nm_linear

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
SCHEMES = [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (5, 16)]


def slow_pack(w, n, m):
    """Spec, element by element: kept values in ascending columns, indices at bit (j*b) % 8."""
    b = R.index_bits(m)
    out, inp = w.shape
    values, idx = [], []
    for r in range(out):
        vrow, irow = [], []
        for g in range(inp // m):
            nz = [p for p in range(m) if w[r, g * m + p] != 0]
            pos = sorted(nz + [p for p in range(m) if p not in nz][:n - len(nz)])
            vrow += [w[r, g * m + p] for p in pos]
            irow += pos
        values.append(vrow)
        idx.append(irow)
    meta = torch.zeros(out, -(-len(idx[0]) * b // 8), dtype=torch.uint8)
    for r in range(out):
        for j, p in enumerate(idx[r]):
            meta[r, (j * b) // 8] |= p << ((j * b) % 8)
    return torch.tensor(values, dtype=w.dtype).reshape(out, -1), meta


def slow_unpack(values, meta, n, m, shape):
    b = R.index_bits(m)
    dense = torch.zeros(shape, dtype=values.dtype)
    for r in range(shape[0]):
        for j in range(values.shape[1]):
            p = (int(meta[r, (j * b) // 8]) >> ((j * b) % 8)) & ((1 << b) - 1)
            dense[r, (j // n) * m + p] = values[r, j]
    return dense


@settings(max_examples=30, deadline=None)
@given(scheme=st.sampled_from(SCHEMES), out=st.integers(1, 5), groups=st.integers(1, 6), seed=st.integers(0, 999),
       full=st.booleans())
def test_pack_unpack_ref_match_slow_loops(scheme, out, groups, seed, full):
    n, m = scheme
    w = R.random_nm_weight(out, groups * m, n, m, seed=seed, full=full)
    values, meta = R.nm_pack_ref(w, n, m)
    slow_values, slow_meta = slow_pack(w, n, m)
    assert torch.equal(values, slow_values) and torch.equal(meta, slow_meta)
    assert torch.equal(R.nm_unpack_ref(values, meta, n, m, w.shape), slow_unpack(values, meta, n, m, w.shape))
    assert torch.equal(R.nm_unpack_ref(values, meta, n, m, w.shape), w)


def test_int4_nibbles_match_spec():
    codes = torch.randint(0, 16, (3, 7), dtype=torch.uint8)
    packed = R.int4_pack_ref(codes)
    for r in range(3):
        for j in range(7):
            assert (int(packed[r, j // 2]) >> (4 * (j % 2))) & 15 == int(codes[r, j])
    assert torch.equal(R.int4_unpack_ref(packed, 7), codes)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,out,inp", [(1, 33, 72), (3, 24, 40), (17, 33, 72)])
def test_nm_linear_matches_dense(n, m, dtype, tokens, out, inp):
    seed = tokens * 100 + inp + n
    w = R.random_nm_weight(out, inp, n, m, seed=seed, dtype=dtype, full=False)
    values, meta = R.nm_pack_ref(w, n, m)
    g = torch.Generator().manual_seed(seed)
    x, bias = torch.randn(tokens, inp, generator=g).to(dtype), torch.randn(out, generator=g).to(dtype)
    got = nm_linear(x, values, meta, n, m, bias)
    want = (x.float() @ w.float().T + bias.float()).to(dtype)  # dense matmul, fp32 math
    assert got.dtype == dtype and got.shape == (tokens, out)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    torch.testing.assert_close(got, R.nm_linear_ref(x, values, meta, n, m, bias), **TOL[dtype])


CONFIGS = {"tiles": {"BLOCK_T": 16, "BLOCK_O": 16, "BLOCK_K": 64, "SPLIT_K": 1},
           "splitk": {"BLOCK_T": 16, "BLOCK_O": 32, "BLOCK_K": 32, "SPLIT_K": 3}}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_other_tiles_and_split_k(config):
    w = R.random_nm_weight(40, 160, 2, 4, seed=7)
    values, meta = R.nm_pack_ref(w, 2, 4)
    x, bias = torch.randn(2, 9, 160), torch.randn(40)  # (..., in) with a leading batch dim
    got = nm_linear(x, values, meta, 2, 4, bias, config=config)
    torch.testing.assert_close(got, x @ w.T + bias, **TOL[torch.float32])


def test_non_contiguous_x_and_no_tokens():
    w = R.random_nm_weight(24, 64, 2, 4, seed=3)
    values, meta = R.nm_pack_ref(w, 2, 4)
    x = torch.randn(64, 5).T  # (5, 64), column-major
    torch.testing.assert_close(nm_linear(x, values, meta, 2, 4), x @ w.T, **TOL[torch.float32])
    assert nm_linear(torch.randn(0, 64), values, meta, 2, 4).shape == (0, 24)


def test_wrapper_errors_name_the_fix():
    w = R.random_nm_weight(8, 32, 2, 4, seed=0)
    values, meta = R.nm_pack_ref(w, 2, 4)
    with pytest.raises(UserError, match="not divisible"):
        nm_linear(torch.randn(2, 30), values, meta, 2, 4)
    with pytest.raises(UserError, match="do not fit"):
        nm_linear(torch.randn(2, 64), values, meta, 2, 4)
    with pytest.raises(UserError, match="contiguous"):
        nm_linear(torch.randn(2, 32), values.T.contiguous().T, meta, 2, 4)
    with pytest.raises(UserError, match="meta"):
        nm_linear(torch.randn(2, 32), values, meta.to(torch.int16), 2, 4)
    with pytest.raises(UserError, match="fp32/fp16/bf16"):
        nm_linear(torch.randn(2, 32), values.to(torch.int8), meta, 2, 4)
    with pytest.raises(UserError, match="M in"):
        nm_linear(torch.randn(2, 36), values, meta, 2, 6)
