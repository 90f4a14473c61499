"""The ``bsr`` format: bit-exact round trips on awkward shapes, byte size from the layout, torch's own
BSR tensor as an independent reading of the same bytes, and block schemes end to end."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import make_tiny

import sparsify
from sparsify import formats
from sparsify.config import CalibConfig, PruneConfig
from sparsify.formats import nbytes

INTS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _block_sparse(out, inp, r, c, keep_p, dtype, seed):
    """A weight whose R x C tiles are kept with probability keep_p; some kept entries are -0.0 or +0.0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    tiles = torch.rand(-(-out // r), -(-inp // c), generator=g) < keep_p  # (Br, Bc)
    keep = tiles.repeat_interleave(r, 0).repeat_interleave(c, 1)[:out, :inp]
    w = torch.where(torch.rand(out, inp, generator=g) < 0.1, -0.0, w)  # -0.0: kept bits
    w = torch.where(torch.rand(out, inp, generator=g) < 0.05, 0.0, w)  # +0.0 inside a kept tile
    return torch.where(keep, w, 0.0).to(dtype), tiles


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 40), inp=st.integers(1, 40), r=st.integers(1, 9), c=st.integers(1, 9),
       keep_p=st.sampled_from([0.0, 1.0]) | st.floats(0, 1), dtype=st.sampled_from(list(INTS)),
       seed=st.integers(0, 2**16))
def test_bsr_round_trip_and_size(out, inp, r, c, keep_p, dtype, seed):
    w, tiles = _block_sparse(out, inp, r, c, keep_p, dtype, seed)
    tensors, attrs = formats.pack("bsr", w, block=(r, c))
    back = formats.unpack("bsr", tensors, attrs)
    assert back.dtype == dtype and torch.equal(back.view(INTS[dtype]), w.view(INTS[dtype]))
    nnz = tensors["values"].shape[0]
    br = -(-out // r)
    assert nbytes(tensors) == nnz * r * c * w.element_size() + nnz * 4 + (br + 1) * 4
    # every tile that holds a non-zero bit pattern is stored, and no other
    bits = torch.nn.functional.pad(w.view(INTS[dtype]), (0, -inp % c, 0, -out % r))
    nonzero = (bits.view(br, r, -1, c) != 0).any(3).any(1)  # (Br, Bc)
    assert nnz == int(nonzero.sum())


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
def test_bsr_is_torchs_layout():
    """torch.sparse_bsr_tensor reads the three tensors as they are and gives back the padded weight."""
    w, _ = _block_sparse(21, 30, 4, 8, 0.4, torch.float32, 3)
    t, attrs = formats.pack("bsr", w, block=(4, 8))
    size = (24, 32)  # padded to whole tiles
    ref = torch.sparse_bsr_tensor(t["row_ptr"], t["col_idx"], t["values"], size=size, check_invariants=True)
    torch.testing.assert_close(ref.to_dense()[:21, :30], w, rtol=0, atol=0)
    x = torch.randn(5, 30, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.nn.functional.linear(x, formats.unpack("bsr", t, attrs)), x @ w.T)


def test_block_schemes_end_to_end(tmp_path):
    """magnitude and Wanda with block:8x16 prune whole tiles, store bsr, reload and run."""
    src = make_tiny("llama", tmp_path / "llama")
    for method in ("magnitude", "wanda", "sparsegpt"):
        cfg = PruneConfig(method=method, scheme="block:8x16", sparsity=0.5,
                          calib=CalibConfig(samples=2, seq_len=16, batch_size=2))
        out = tmp_path / method
        m = sparsify.prune(str(src), cfg, out)
        assert {e["format"] for e in m["tensors"].values()} == {"bsr"}
        loaded, _ = sparsify.load(out)
        from sparsify.runtime.sparse_linear import SparseLinear

        for name, mod in loaded.model.named_modules():
            if isinstance(mod, SparseLinear):
                w = mod.dense_weight()  # (out, in)
                tiles = (w.view(w.shape[0] // 8, 8, w.shape[1] // 16, 16) != 0).any(3).any(1)  # (Br, Bc)
                assert tiles.float().mean() == 0.5, (method, name)  # half the tiles, whole
        with torch.inference_mode():
            logits = loaded.model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
        assert torch.isfinite(logits).all()
