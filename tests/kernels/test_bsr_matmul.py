"""BSR Triton kernel (interpreter) against the tile-by-tile reference and a dense matmul, awkward shapes.

Tolerances: fp32 1e-4 (fp32 accumulation, different order); fp16 2e-3 (both round the fp32 sum once:
one fp16 ulp, 2**-10); bf16 1.6e-2 (two bf16 ulps: the interpreter truncates fp32 -> bf16).
"""
import pytest
import torch

from sparsify import formats
from sparsify.errors import UserError
from sparsify.kernels import reference as R
from sparsify.kernels.triton.bsr_matmul import bsr_linear

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def _weight(out, inp, r, c, keep, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    tiles = torch.rand(-(-out // r), -(-inp // c), generator=g) < keep  # (Br, Bc)
    mask = tiles.repeat_interleave(r, 0).repeat_interleave(c, 1)[:out, :inp]
    return torch.where(mask, torch.randn(out, inp, generator=g), 0.0).to(dtype)


@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("out, inp, block, keep", [(48, 64, (16, 16), 0.5), (37, 50, (16, 32), 0.6),
                                                   (20, 33, (32, 16), 1.0), (40, 40, (16, 16), 0.0)])
@pytest.mark.parametrize("dtype", list(TOL))
def test_bsr_kernel_matches_reference(tokens, out, inp, block, keep, dtype):
    w = _weight(out, inp, *block, keep, seed=out + inp, dtype=dtype)
    t, attrs = formats.pack("bsr", w, block=block)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(2, tokens, inp, generator=g).to(dtype)  # (2, T, in): a leading batch dim too
    bias = torch.randn(out, generator=g).to(dtype)
    got = bsr_linear(x, t["values"], t["col_idx"], t["row_ptr"], attrs["shape"], bias)
    want = R.bsr_linear_ref(x, t["values"], t["col_idx"], t["row_ptr"], attrs["shape"], bias)
    dense = (x.float() @ w.float().T + bias.float()).to(dtype)  # independent of both: the dense weight
    assert got.shape == (2, tokens, out) and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(want, dense, **TOL[dtype])


def test_bsr_kernel_refuses_what_it_cannot_run():
    w = _weight(16, 16, 8, 16, 1.0, 0, torch.float32)
    t, attrs = formats.pack("bsr", w, block=(8, 16))
    with pytest.raises(UserError, match="powers of two >= 16"):
        bsr_linear(torch.randn(1, 16), t["values"], t["col_idx"], t["row_ptr"], attrs["shape"])
    t, attrs = formats.pack("bsr", _weight(16, 32, 16, 16, 1.0, 0, torch.float32), block=(16, 16))
    with pytest.raises(UserError, match="input features"):
        bsr_linear(torch.randn(1, 16), t["values"], t["col_idx"], t["row_ptr"], attrs["shape"])


def test_dispatch_sends_bsr_to_the_kernel(monkeypatch):
    from sparsify import kernels

    x = torch.randn(3, 32)
    for block, path in (((16, 16), "triton-bsr"), ((8, 16), "reference")):
        t, attrs = formats.pack("bsr", _weight(32, 32, *block, 0.5, 1, torch.float32), block=block)
        monkeypatch.setenv("SPARSIFY_KERNELS", "triton")
        assert kernels.kernel_name(x, "bsr", attrs) == path
        got = kernels.linear(x, "bsr", t, attrs)
        monkeypatch.setenv("SPARSIFY_KERNELS", "reference")
        torch.testing.assert_close(got, kernels.linear(x, "bsr", t, attrs), **TOL[torch.float32])
