"""ADMM weight reconstruction with gradual mask selection (Boza 2024, arXiv 2401.02938).

One layer's problem: min ||X W^T - X W'^T||^2 over W' that is zero off the mask (and, with
``quantize``, on the quantization grid). In coordinates where every input has unit norm,
V = W diag(n) with n_i = sqrt(H_ii), |V| is Wanda's score and A = diag(n)^-1 H diag(n)^-1
(+ ``damp`` I) has a unit diagonal. ADMM alternates

    Z <- P(V + U)                              projection: the mask (and the grid)
    U <- U + V - Z                             scaled dual
    V <- (V0 A + rho (Z - U)) (A + rho I)^-1   one inverse per input, shared by q/k/v and gate/up

and returns P(V + U). The mask: in the first ``gradual`` iterations the entries that the final pattern
drops (the pattern chosen on |V + U|, rebuilt every iteration) leave a growing share at a time, the
lowest |V + U| first, on the cubic schedule 1 - (1 - t / gradual)^3, so the weights move before
the mask settles. With ``gradual=0`` the mask is Wanda's, fixed, and only the weights are solved.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsify.errors import UserError
from sparsify.pruners.base import Pruner
from sparsify.pruners.masks import apply_mask, mask_for
from sparsify.tables import PRUNERS


@dataclass
class ADMMConfig:
    iters: int = 20  # ADMM iterations
    gradual: int = 15  # iterations over which the mask reaches its final sparsity (0: fixed from the start)
    rho: float = 1.0  # ADMM penalty, relative to the unit diagonal of A
    damp: float = 0.1  # added to A's unit diagonal
    score: str = "wanda"  # mask score on the current weights Y: "wanda" |Y| n, or "ria" (relative importance)
    alpha: float = 0.5  # "ria": the power of the input norm n

    def __post_init__(self):
        if self.score not in ("wanda", "ria"):
            raise UserError(f"--method-arg score={self.score!r}: use 'wanda' or 'ria'")


def _mask_score(Vn: torch.Tensor, n: torch.Tensor, safe: torch.Tensor, config: ADMMConfig) -> torch.Tensor:
    """(out, in) importance of the normalized weights Vn = Y diag(n). "wanda": |Y| n = |Vn|. "ria" (Zhang
    et al. 2024, relative importance and activations): (|Y| / its row sum + |Y| / its column sum) n^alpha."""
    if config.score == "wanda":
        return Vn.abs()
    a = (Vn / safe).abs()  # (out, in) |Y|
    rel = a / a.sum(1, keepdim=True).clamp(min=1e-30) + a / a.sum(0, keepdim=True).clamp(min=1e-30)
    return rel * n.pow(config.alpha)


def _schedule_mask(score: torch.Tensor, scheme, sparsity: float, per: str, share: float) -> torch.Tensor:
    """Keep-mask that drops ``share`` of what the final pattern on ``score`` drops: the lowest scores.

    Intermediate masks only steer the iterations, so the share is cut by one threshold (kthvalue);
    at share 1 the mask is exactly the final pattern.
    """
    keep = mask_for(score, scheme, sparsity, per)  # (out, in)
    if share >= 1:
        return keep
    candidates = score[~keep]  # (dropped,)
    k = int(candidates.numel() * share)
    if k == 0:
        return torch.ones_like(keep)
    threshold = candidates.kthvalue(k).values
    return keep | (score > threshold)


def prune(weight: torch.Tensor, stats, scheme, sparsity: float, per: str, config: ADMMConfig,
          quantize=None) -> torch.Tensor:
    """ADMM on one layer.

    Args:
        weight: (out, in) dense weight, any float dtype.
        stats: the layer's `sparsify.calibrate.stats.Hessian` (shared; read-only).
        quantize: optional `sparsify.quant.rtn.ColumnQuantizer`; its scales define the grid that
            every projection rounds onto.
    Returns:
        (out, in) tensor in weight's dtype, +0.0 where pruned.
    """
    from sparsify.quant.rtn import snap

    if scheme.kind == "dense" and quantize is None:
        return weight.clone()
    n, A, inv = stats.normalized_inverse(config.damp, config.rho)  # (in,), (in, in), (in, in)
    n, A, inv = n.to(weight.device), A.to(weight.device), inv.to(weight.device)
    safe = torch.where(n > 0, n, torch.ones_like(n))  # (in,)
    V = weight.float() * n  # (out, in); inputs that never fired count as zero weights
    B = V @ A  # (out, in)
    U = torch.zeros_like(V)

    def project(Y, keep):  # (out, in) normalized -> normalized
        if quantize is None:
            return Y * keep
        return snap(Y / safe, quantize.params) * safe * keep

    keep = None
    for t in range(config.iters):
        if keep is None or t < config.gradual:
            share = 1.0 if config.gradual == 0 else min(1.0, 1 - (1 - (t + 1) / config.gradual) ** 3)
            keep = _schedule_mask(_mask_score(V + U, n, safe, config), scheme, sparsity, per, share)
        Z = project(V + U, keep)
        U += V - Z
        V = (B + config.rho * (Z - U)) @ inv  # (out, in)
    if config.iters <= config.gradual:
        keep = mask_for(_mask_score(V + U, n, safe, config), scheme, sparsity, per)
    W = project(V + U, keep) / safe  # (out, in)
    if quantize is not None:
        W = snap(W, quantize.params)
    return apply_mask(W.to(weight.dtype), keep & (W != 0))


PRUNERS["admm"] = Pruner("admm", ADMMConfig, "hessian", prune,
                         "ADMM reconstruction with gradual mask selection", joint_quant=True)
