"""SparseGPT (Frantar & Alistarh 2023): mask selection plus optimal-brain-surgeon weight updates,
column by column with the upper Cholesky factor U of the damped inverse Hessian.

Walk the input columns in blocks of ``blocksize``. For each column c: q = the column with the
pruned rows zeroed (and, with ``quantize``, the kept values rounded), err = (w - q) / U_cc, and the
later columns of the block absorb err * U_c,rest. After a block, its accumulated errors update all
later columns at once (one matmul: the "lazy batch" update).

Mask choice, scored by w^2 / U_cc^2 on the already-updated weights:
  unstructured, per="row"   each row of each block drops its share of the row's int(in * s) lowest
                            (the per-block counts are cumulative roundings, so the total is exact);
  unstructured, per="layer" one threshold over each whole block (all rows), as the reference code
                            does; the blocks' counts again sum to exactly int(numel * s);
  N:M                       chosen at the start of every M-column group (blocksize is rounded up
                            to a multiple of M so that no group straddles two blocks);
  block:RxC                 tiles chosen once up front (a tile spans several column blocks), then
                            the OBS updates reconstruct the kept weights;
  dense                     nothing pruned: with ``quantize`` this is GPTQ, without it a copy.

Work is done on the transposed weight (in, out), so a column is one contiguous row of memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsify.pruners.base import Pruner
from sparsify.pruners.masks import block_mask, drop_lowest, nm_mask
from sparsify.tables import PRUNERS


@dataclass
class SparseGPTConfig:
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal before inverting
    blocksize: int = 128  # columns per lazy-update block
    groupsize: int = 8  # columns per inner lazy-update group (N:M uses M): fewer, larger updates


def _unstructured_block(score, i1, i2, sparsity, per):
    """(cols, out) True = prune for columns [i1, i2); score is (cols, out)."""
    cols, out = score.shape
    if per == "row":
        k = int(i2 * sparsity) - int(i1 * sparsity)
        return ~drop_lowest(score.T, k).T  # (cols, out)
    k = int(out * i2 * sparsity) - int(out * i1 * sparsity)
    return ~drop_lowest(score.reshape(-1), k).view(cols, out)


def _group(Wb, Ub, Pb, Err, g1, g2, quantize) -> None:
    """Columns [g1, g2) of a block one by one: each column's error (w - q) / U_cc updates only the
    group's later columns here; the caller applies the group's errors to the rest in one matmul."""
    if quantize is None:  # q = w where kept, so err = w * pruned / U_cc and the kept values stand as they are
        scale = Pb[g1:g2] / torch.diagonal(Ub)[g1:g2, None]  # (g, out)
    for i in range(g1, g2):
        w = Wb[i]  # (out,)
        if quantize is None:
            torch.mul(w, scale[i - g1], out=Err[i])
        else:
            q = torch.where(Pb[i], 0.0, quantize(torch.where(Pb[i], 0.0, w), i))  # pruned rows stay exactly zero
            torch.div(w - q, Ub[i, i], out=Err[i])
            Wb[i] = q
        if i + 1 < g2:
            Wb[i + 1:g2].addr_(Ub[i, i + 1:g2], Err[i], alpha=-1)  # (g2-i-1, out)


def prune(weight: torch.Tensor, stats, scheme, sparsity: float, per: str, config: SparseGPTConfig,
          quantize=None) -> torch.Tensor:
    """SparseGPT on one layer.

    Args:
        weight: (out, in) dense weight, any float dtype.
        stats: the layer's `sparsify.calibrate.stats.Hessian` (shared with sibling layers; read-only).
        scheme, sparsity, per: the pattern (see module docstring).
        config: damping and block size.
        quantize: optional ``quantize(w, c) -> q`` rounding column c (out,) fp32 inside the loop.
    Returns:
        (out, in) tensor in weight's dtype, +0.0 where pruned.
    """
    if scheme.kind == "dense" and quantize is None:
        return weight.clone()
    out, inp = weight.shape
    if scheme.kind == "nm" and inp % scheme.m:
        raise ValueError(f"N:M needs in_features divisible by {scheme.m}; got shape {list(weight.shape)}")
    U, dead = stats.factor(config.damp)  # (in, in) upper, (in,)
    U, dead = U.to(weight.device), dead.to(weight.device)
    d = torch.diag(U)  # (in,)
    Wt = weight.float().T.contiguous()  # (in, out): row c of Wt is column c of W
    Wt[dead] = 0
    prune_t = torch.zeros_like(Wt, dtype=torch.bool)  # (in, out) True = pruned
    if scheme.kind == "block":
        score = (Wt.T / d[None, :]).pow(2)  # (out, in)
        prune_t = ~block_mask(score, scheme.block, sparsity).T.contiguous()
    step = scheme.m if scheme.kind == "nm" else config.groupsize
    bs = config.blocksize if scheme.kind != "nm" else -(-config.blocksize // step) * step  # no N:M group straddles
    for i1 in range(0, inp, bs):
        i2 = min(i1 + bs, inp)
        Wb, Ub, Pb = Wt[i1:i2], U[i1:i2, i1:i2], prune_t[i1:i2]  # views: (cols, out), (cols, cols), (cols, out)
        if scheme.kind == "unstructured":
            Pb.copy_(_unstructured_block((Wb / d[i1:i2, None]).pow(2), i1, i2, sparsity, per))
        Err = torch.empty_like(Wb)  # (cols, out)
        for g1 in range(0, i2 - i1, step):
            g2 = min(g1 + step, i2 - i1)
            if scheme.kind == "nm":
                score = (Wb[g1:g2] / d[i1 + g1:i1 + g2, None]).pow(2)  # (m, out)
                Pb[g1:g2] = ~nm_mask(score.T, scheme.n, scheme.m).T
            _group(Wb, Ub, Pb, Err, g1, g2, None if quantize is None else lambda q, c: quantize(q, i1 + c))
            Wb[g2:].addmm_(Ub[g1:g2, g2:].T, Err[g1:g2], alpha=-1)  # lazy update of the block's later columns
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err, alpha=-1)  # lazy update of all later columns
    W = Wt.masked_fill_(prune_t, 0.0).T.to(weight.dtype).contiguous()  # (out, in); in place: fewer copies held
    return W.masked_fill_(W == 0, 0.0)  # +0.0 only, also where a kept value underflowed


PRUNERS["sparsegpt"] = Pruner("sparsegpt", SparseGPTConfig, "hessian", prune,
                              "OBS updates with the inverse Hessian", joint_quant=True,
                                  rows_independent=True)
