"""Mask builders against brute-force loops on fresh random scores."""
from __future__ import annotations

import pytest
import torch

from sparsify.config import Scheme
from sparsify.pruners.masks import apply_mask, block_mask, layer_mask, mask_for, nm_mask, row_mask


def _drop_loop(values: list[float], k: int) -> list[bool]:
    """Keep flags dropping the k lowest, ties: lower index first."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    drop = set(order[:k])
    return [i not in drop for i in range(len(values))]


@pytest.mark.parametrize("shape,s", [((7, 13), 0.5), ((3, 8), 0.0), ((5, 9), 0.9), ((1, 1), 0.5)])
def test_row_and_layer_masks(shape, s):
    score = torch.randn(shape)
    expect_row = torch.tensor([_drop_loop(r.tolist(), int(shape[1] * s)) for r in score])
    assert torch.equal(row_mask(score, s), expect_row)
    expect_layer = torch.tensor(_drop_loop(score.flatten().tolist(), int(score.numel() * s))).view(shape)
    assert torch.equal(layer_mask(score, s), expect_layer)


def test_ties_are_deterministic():
    score = torch.zeros(2, 8)
    assert torch.equal(row_mask(score, 0.5), torch.tensor([[False] * 4 + [True] * 4] * 2))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (6, 8)])
def test_nm_mask(n, m):
    score = torch.randn(5, m * 6)
    got = nm_mask(score, n, m)
    for r in range(5):
        for g in range(6):
            seg = score[r, g * m:(g + 1) * m].tolist()
            assert got[r, g * m:(g + 1) * m].tolist() == _drop_loop(seg, m - n)
    with pytest.raises(ValueError):
        nm_mask(torch.randn(2, 6), 2, 4)


def test_block_mask_vs_loop():
    score, (R, C), s = torch.rand(10, 14), (4, 4), 0.5
    tiles = {}
    for i in range(0, 10, R):
        for j in range(0, 14, C):
            tiles[(i, j)] = score[i:i + R, j:j + C].mean().item()
    keys = list(tiles)
    keep = dict(zip(keys, _drop_loop([tiles[k] for k in keys], int(len(keys) * s))))
    expect = torch.zeros(10, 14, dtype=torch.bool)
    for (i, j), k in keep.items():
        expect[i:i + R, j:j + C] = k
    assert torch.equal(block_mask(score, (R, C), s), expect)


def test_mask_for_dispatch_and_apply():
    score = torch.randn(4, 8)
    assert mask_for(score, Scheme.parse("dense"), 0.5).all()
    assert torch.equal(mask_for(score, Scheme.parse("2:4"), 0.0), nm_mask(score, 2, 4))
    w = -torch.rand(4, 8)
    out = apply_mask(w, mask_for(score, Scheme.parse("unstructured"), 0.5, "layer"))
    zeros = out[out == 0]
    assert zeros.numel() == 16 and not torch.signbit(zeros).any()  # +0.0, never -0.0
