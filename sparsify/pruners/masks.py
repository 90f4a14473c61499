"""Mask builders: the one place every method turns importance scores into a keep-mask.

Masks are bool tensors, True = keep; scores: higher = more important. Ties are broken
deterministically: among equal scores the lower flat index is dropped first (stable sort).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _drop_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask dropping the k lowest entries along the last dim."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        order = score.argsort(dim=-1, stable=True)
        keep.scatter_(-1, order[..., :k], False)
    return keep


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, drop the int(in * sparsity) lowest scores."""
    return _drop_lowest(score, int(score.shape[-1] * sparsity))


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One threshold for the whole matrix: drop the int(numel * sparsity) lowest scores."""
    return _drop_lowest(score.reshape(-1), int(score.numel() * sparsity)).view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In each group of m consecutive input columns keep the n highest scores."""
    out, inp = score.shape
    if inp % m:
        raise ValueError(f"N:M needs in_features divisible by {m}; got shape {list(score.shape)}")
    return _drop_lowest(score.view(out, inp // m, m), m - n).view(out, inp)


def block_mask(score: torch.Tensor, block: tuple[int, int], sparsity: float) -> torch.Tensor:
    """R x C tiles (edges padded); tile score = mean over its real elements; drop the lowest tiles."""
    (r, c), (out, inp) = block, score.shape
    pr, pc = -out % r, -inp % c
    shape = ((out + pr) // r, r, (inp + pc) // c, c)
    total = F.pad(score.float(), (0, pc, 0, pr)).view(shape).sum((1, 3))
    count = F.pad(torch.ones_like(score, dtype=torch.float32), (0, pc, 0, pr)).view(shape).sum((1, 3))
    tiles = layer_mask(total / count, sparsity)  # (out/R, in/C)
    return tiles.repeat_interleave(r, 0).repeat_interleave(c, 1)[:out, :inp]


_BY_KIND = {
    "unstructured": lambda score, scheme, sparsity, per: (row_mask if per == "row" else layer_mask)(score, sparsity),
    "nm": lambda score, scheme, sparsity, per: nm_mask(score, scheme.n, scheme.m),
    "block": lambda score, scheme, sparsity, per: block_mask(score, scheme.block, sparsity),
    "dense": lambda score, scheme, sparsity, per: torch.ones_like(score, dtype=torch.bool),
}


def mask_for(score: torch.Tensor, scheme, sparsity: float, per: str = "row") -> torch.Tensor:
    """Keep-mask for a scheme (`sparsify.config.Scheme`)."""
    return _BY_KIND[scheme.kind](score, scheme, sparsity, per)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dropped entries become +0.0 (never -0.0), as the packers expect."""
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
