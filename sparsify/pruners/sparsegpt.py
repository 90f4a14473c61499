"""SparseGPT (Frantar & Alistarh 2023): mask selection plus optimal-brain-surgeon weight updates,
column by column with the upper Cholesky factor U of the damped inverse Hessian.

Unstructured: the mask of each ``blocksize``-column block drops the lowest w^2 / U_cc^2 — per row
(each row loses exactly int(cols * sparsity) per block; ``per="row"``) or with one threshold over the
whole block as the reference code does (``per="layer"``). N:M: chosen at the start of every M-column
group from the already-updated weights. ``quantize(w, c)`` (optional) rounds each column inside the
loop, so the rounding error is compensated by the later columns too (joint prune + quantize).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsify.pruners.base import Pruner
from sparsify.pruners.masks import layer_mask, nm_mask, row_mask
from sparsify.registry import PRUNERS


@dataclass
class SparseGPTConfig:
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    blocksize: int = 128  # columns per lazy-update block


def _block_prune_mask(W1, d1, scheme, sparsity, per):
    """(out, cols) True = prune, for an unstructured block (N:M is chosen per group in the loop)."""
    if scheme.kind != "unstructured":
        return torch.zeros_like(W1, dtype=torch.bool)
    score = W1.pow(2) / d1.pow(2)[None, :]  # (out, cols)
    return ~(row_mask if per == "row" else layer_mask)(score, sparsity)


def prune(weight: torch.Tensor, stats, scheme, sparsity: float, per: str, config: SparseGPTConfig,
          quantize=None) -> torch.Tensor:
    W = weight.float().clone()  # (out, in)
    out, inp = W.shape
    U, dead = stats.factor(config.damp)  # (in, in), (in,)
    U = U.to(W.device)
    W[:, dead.to(W.device)] = 0
    pruned = torch.zeros_like(W, dtype=torch.bool)
    nm = scheme.kind == "nm"
    for i1 in range(0, inp, config.blocksize):
        i2 = min(i1 + config.blocksize, inp)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]  # (out, cols), (cols, cols)
        d1 = torch.diag(U1)  # (cols,)
        mask1 = _block_prune_mask(W1, d1, scheme, sparsity, per)
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if nm and (i1 + i) % scheme.m == 0:
                score = W1[:, i:i + scheme.m].pow(2) / d1[i:i + scheme.m].pow(2)[None, :]  # (out, m)
                mask1[:, i:i + scheme.m] = ~nm_mask(score, scheme.n, scheme.m)
            w = W1[:, i]  # (out,)
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            if quantize is not None:
                q = quantize(q, i1 + i)
            err = (w - q) / d1[i]  # (out,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy update of the later columns
    W = torch.where(pruned, torch.zeros((), dtype=W.dtype, device=W.device), W).to(weight.dtype)
    return torch.where(W == 0, torch.zeros((), dtype=W.dtype, device=W.device), W)  # no -0.0 (underflow)


PRUNERS["sparsegpt"] = Pruner("sparsegpt", SparseGPTConfig, "hessian", prune,
                              "OBS updates with the inverse Hessian", joint_quant=True)
