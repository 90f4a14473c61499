"""Mask builders against brute-force loops on fresh random scores."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify.config import Scheme
from sparsify.errors import UserError
from sparsify.pruners.masks import apply_mask, block_mask, drop_lowest, layer_mask, mask_for, nm_mask, row_mask


def _drop_loop(values: list[float], k: int) -> list[bool]:
    """Keep flags dropping the k lowest, ties: lower index first."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    drop = set(order[:k])
    return [i not in drop for i in range(len(values))]


def _scores(seed: int, shape, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values, so ties are everywhere
        return torch.randint(0, 3, shape, generator=g).float()
    return torch.randn(shape, generator=g)


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 9), inp=st.integers(1, 17), s=st.floats(0.0, 0.99), seed=st.integers(0, 10**6),
       ties=st.booleans())
def test_row_and_layer_masks_vs_loop(out, inp, s, seed, ties):
    score = _scores(seed, (out, inp), ties)
    expect_row = torch.tensor([_drop_loop(r.tolist(), int(inp * s)) for r in score]).view(out, inp)
    got_row = row_mask(score, s)
    assert torch.equal(got_row, expect_row)
    assert (~got_row).sum().item() == out * int(inp * s)  # exact count
    expect_layer = torch.tensor(_drop_loop(score.flatten().tolist(), int(score.numel() * s))).view(out, inp)
    got_layer = layer_mask(score, s)
    assert torch.equal(got_layer, expect_layer)
    assert (~got_layer).sum().item() == int(out * inp * s)


def test_ties_are_deterministic():
    score = torch.zeros(2, 8)
    assert torch.equal(row_mask(score, 0.5), torch.tensor([[False] * 4 + [True] * 4] * 2))
    assert torch.equal(layer_mask(score, 0.25), torch.tensor([[False] * 4 + [True] * 4, [True] * 8]))
    assert torch.equal(drop_lowest(torch.ones(5), 2), torch.tensor([False, False, True, True, True]))


@settings(max_examples=30, deadline=None)
@given(nm=st.sampled_from([(2, 4), (1, 4), (4, 8), (6, 8), (1, 2), (3, 16)]), out=st.integers(1, 6),
       groups=st.integers(1, 5), seed=st.integers(0, 10**6), ties=st.booleans())
def test_nm_mask_vs_loop(nm, out, groups, seed, ties):
    (n, m) = nm
    score = _scores(seed, (out, m * groups), ties)
    got = nm_mask(score, n, m)
    for r in range(out):
        for g in range(groups):
            seg = score[r, g * m:(g + 1) * m].tolist()
            assert got[r, g * m:(g + 1) * m].tolist() == _drop_loop(seg, m - n)
    assert (got.view(out, groups, m).sum(-1) == n).all()  # exactly n kept per group


def test_nm_mask_rejects_ragged_width_and_accepts_views():
    with pytest.raises(ValueError):
        nm_mask(torch.randn(2, 6), 2, 4)
    score = torch.randn(8, 6)
    assert torch.equal(nm_mask(score.T, 2, 4), nm_mask(score.T.contiguous(), 2, 4))  # non-contiguous input


def _block_loop(score, R, C, s):
    out, inp = score.shape
    tiles = {(i, j): score[i:i + R, j:j + C].mean().item() for i in range(0, out, R) for j in range(0, inp, C)}
    keys = list(tiles)  # row-major tile order, as the flat index of the tile grid
    keep = dict(zip(keys, _drop_loop([tiles[k] for k in keys], int(len(keys) * s))))
    expect = torch.zeros(out, inp, dtype=torch.bool)
    for (i, j), k in keep.items():
        expect[i:i + R, j:j + C] = k
    return expect


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 13), inp=st.integers(1, 15), R=st.integers(1, 5), C=st.integers(1, 5),
       s=st.floats(0.0, 0.95), seed=st.integers(0, 10**6))
def test_block_mask_vs_loop(out, inp, R, C, s, seed):
    score = _scores(seed, (out, inp), False).abs()
    assert torch.equal(block_mask(score, (R, C), s), _block_loop(score, R, C, s))


def test_block_mask_edge_tiles_use_real_elements_only():
    score = torch.ones(5, 5)  # tiles 4x4: the edge tiles hold 1x4, 4x1, 1x1 real elements of value 1
    score[:4, :4] = 0.9  # the one full tile is the weakest by mean, though its sum is the largest
    keep = block_mask(score, (4, 4), 0.25)  # 4 tiles -> drop 1
    assert not keep[:4, :4].any() and keep[4].all() and keep[:, 4].all()


def test_mask_for_dispatch_and_apply():
    score = torch.randn(4, 8)
    assert mask_for(score, Scheme.parse("dense"), 0.5).all()
    assert torch.equal(mask_for(score, Scheme.parse("2:4"), 0.0), nm_mask(score, 2, 4))
    assert torch.equal(mask_for(score, Scheme.parse("unstructured"), 0.5, "row"), row_mask(score, 0.5))
    assert torch.equal(mask_for(score, Scheme.parse("block:2x4"), 0.5), block_mask(score, (2, 4), 0.5))
    with pytest.raises(UserError, match="row"):
        mask_for(score, Scheme.parse("unstructured"), 0.5, "column")
    w = -torch.rand(4, 8)
    out = apply_mask(w, mask_for(score, Scheme.parse("unstructured"), 0.5, "layer"))
    zeros = out[out == 0]
    assert zeros.numel() == 16 and not torch.signbit(zeros).any()  # +0.0, never -0.0
    assert torch.equal(out != 0, layer_mask(score, 0.5)) and out.dtype == w.dtype
