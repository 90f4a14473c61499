"""Mask builders: the one place every method turns importance scores into a keep-mask.

Masks are bool tensors, True = keep; scores: higher = more important. Ties are broken
deterministically: among equal scores the lower index (flat, row-major, for per-layer masks) is
dropped first, because every builder ends in one stable sort (`drop_lowest`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsify.errors import UserError


def drop_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask that drops the k lowest entries along the last dim (ties: lower index first).

    Args:
        score: (..., n) importance, any float dtype.
        k: how many entries of every last-dim slice to drop, 0 <= k <= n.
    Returns:
        (..., n) bool, True = keep.
    """
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        order = score.argsort(dim=-1, stable=True)  # (..., n) ascending
        keep.scatter_(-1, order[..., :k], False)
    return keep


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, drop the int(in * sparsity) lowest scores of score (out, in)."""
    return drop_lowest(score, int(score.shape[-1] * sparsity))


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One threshold for the whole matrix: drop the int(numel * sparsity) lowest scores."""
    return drop_lowest(score.reshape(-1), int(score.numel() * sparsity)).view(score.shape)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In each group of m consecutive input columns of score (out, in) keep the n highest.

    Raises ValueError when in is not a multiple of m (callers skip such layers up front).
    """
    out, inp = score.shape
    if inp % m:
        raise ValueError(f"N:M needs in_features divisible by {m}; got shape {list(score.shape)}")
    groups = score.reshape(out, inp // m, m)  # (out, in/m, m)
    return drop_lowest(groups, m - n).view(out, inp)


def block_mask(score: torch.Tensor, block: tuple[int, int], sparsity: float) -> torch.Tensor:
    """Keep or drop whole R x C tiles of score (out, in).

    Edge tiles are padded; a tile's score is the mean over its real elements only (padding does not
    dilute it). The int(n_tiles * sparsity) lowest tiles are dropped, one threshold over the layer.
    """
    (r, c), (out, inp) = block, score.shape
    pr, pc = -out % r, -inp % c
    tiled = ((out + pr) // r, r, (inp + pc) // c, c)
    total = F.pad(score.float(), (0, pc, 0, pr)).view(tiled).sum((1, 3))  # (out/R, in/C)
    real = F.pad(torch.ones_like(score, dtype=torch.float32), (0, pc, 0, pr)).view(tiled).sum((1, 3))
    tiles = layer_mask(total / real, sparsity)  # (out/R, in/C)
    return tiles.repeat_interleave(r, 0).repeat_interleave(c, 1)[:out, :inp]


_PER = {"row": row_mask, "layer": layer_mask}

_BY_KIND = {
    "unstructured": lambda score, scheme, sparsity, per: _PER[per](score, sparsity),
    "nm": lambda score, scheme, sparsity, per: nm_mask(score, scheme.n, scheme.m),
    "block": lambda score, scheme, sparsity, per: block_mask(score, scheme.block, sparsity),
    "dense": lambda score, scheme, sparsity, per: torch.ones_like(score, dtype=torch.bool),
}


def mask_for(score: torch.Tensor, scheme, sparsity: float, per: str = "row") -> torch.Tensor:
    """Keep-mask of score (out, in) for a `sparsify.config.Scheme`.

    ``per`` ("row" | "layer") only matters for unstructured schemes; N:M ignores ``sparsity``
    (its sparsity is 1 - n/m) and ``dense`` keeps everything.
    """
    if per not in _PER:
        raise UserError(f"--per {per!r}: use 'row' or 'layer'")
    if scheme.kind not in _BY_KIND:
        raise UserError(f"scheme {scheme!s} is not supported here: use unstructured, N:M or block:RxC")
    return _BY_KIND[scheme.kind](score, scheme, sparsity, per)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dropped entries become +0.0 (never -0.0, which a packer would count as a kept value)."""
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
