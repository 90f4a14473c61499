"""LPViT's per-layer curves: distortion D(s) in closed form from sorted block scores, and cost P(s).

A layer's weight W (out, in) and gradient signal g (same shape) are tiled into R x C blocks (edge
tiles padded; padding counts for nothing). Block score = mean over the tile's real elements of
|W * g|; at sparsity s the floor(n_tiles * s) lowest-scoring tiles are removed (exactly what
`sparsify.pruners.masks.block_mask` removes at that sparsity when it ranks by the same score).
With dW the removed weights, the distortion (second-order Taylor term with a rank-1 Fisher) is

    D = mean((g * dW)^2) + 1/2 (g . dW)^2 + 1/2 lambda ||dW||^2        (mean over the layer's numel)

Each term is a sum over removed tiles of a per-tile quantity (the square of ``g . dW`` is taken of
the sum), so after one sort of the tiles three cumulative sums give D for every count of removed
tiles: O(numel) in all, O(1) per point, never a loop over pairs. Between whole tiles the curve is
linearly interpolated (as if a fraction of the next tile went), so that small layers (16 tiles)
still have a slope at every grid point; at whole-tile points it is exact.

The cost P(s) is the cost of the *surviving* blocks (our choice; the reference code counts the
pruned blocks, which reads sign-flipped): ``flops`` = surviving weights x tokens the layer sees per
sample, ``blocks`` = surviving tiles. P falls as s grows, so adding ``beta * P`` lowers the slope of
layers whose blocks cost more, and the equal-slope solver then prunes those layers more.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LAMBDA = 1e-7
COST_MODELS = ("flops", "blocks")


@dataclass
class TileCurve:
    """One layer's tiles in removal order (lowest score first) and the cumulative sums of D's terms.

    Every tensor is (n_tiles + 1,) float64, entry k = the value with the k lowest tiles removed.
    """

    sq: torch.Tensor  # sum over removed elements of (g * W)^2
    dot: torch.Tensor  # sum over removed elements of g * W
    norm: torch.Tensor  # sum over removed elements of W^2
    removed: torch.Tensor  # real (unpadded) elements removed
    numel: int
    lam: float = LAMBDA

    @property
    def tiles(self) -> int:
        return self.sq.numel() - 1

    def distortion(self) -> torch.Tensor:
        """(n_tiles + 1,) D with k = 0..n_tiles lowest tiles removed."""
        return self.sq / self.numel + 0.5 * self.dot ** 2 + 0.5 * self.lam * self.norm


def tile_sums(weight: torch.Tensor, grad: torch.Tensor, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Per-tile sums (row-major tile order) of |W g| (the score, before the mean), (W g)^2, W g, W^2, real count.

    Returns a dict of (n_tiles,) float64 tensors: ``score`` (mean |W g| over real elements), ``sq``,
    ``dot``, ``norm``, ``real``.
    """
    (r, c), (out, inp) = block, weight.shape
    pr, pc = -out % r, -inp % c
    tiled = ((out + pr) // r, r, (inp + pc) // c, c)

    def per_tile(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, pc, 0, pr)).view(tiled).sum((1, 3)).reshape(-1)  # (n_tiles,)

    w, g = weight.double(), grad.double()  # (out, in)
    wg = w * g  # (out, in)
    real = per_tile(torch.ones_like(w))
    return {"score": per_tile(wg.abs()) / real, "sq": per_tile(wg ** 2), "dot": per_tile(wg),
            "norm": per_tile(w ** 2), "real": real}


def tile_curve(weight: torch.Tensor, grad: torch.Tensor, block: tuple[int, int], lam: float = LAMBDA) -> TileCurve:
    """Sort the tiles by score (stable, ascending: the order `block_mask` drops them) and accumulate."""
    t = tile_sums(weight, grad, block)
    order = t["score"].argsort(stable=True)  # (n_tiles,)

    def cum(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.new_zeros(1), x[order].cumsum(0)])  # (n_tiles + 1,)

    return TileCurve(cum(t["sq"]), cum(t["dot"]), cum(t["norm"]), cum(t["real"]), weight.numel(), lam)


def grid(step: float = 0.01) -> torch.Tensor:
    """(G,) sparsities 0, step, ..., 1 (float64)."""
    n = round(1 / step)
    return torch.arange(n + 1, dtype=torch.float64) / n


def at_grid(per_tile: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(n_tiles + 1,) values by whole tiles removed -> (G,) values at sparsities s, linear between tiles."""
    n = per_tile.numel() - 1
    x = s * n  # (G,) fractional tiles removed
    k = x.floor().clamp(max=n - 1).long() if n else torch.zeros_like(x, dtype=torch.long)
    frac = x - k
    upper = per_tile[(k + 1).clamp(max=n)]
    return per_tile[k] + frac * (upper - per_tile[k])  # (G,)


def distortion_curve(weight, grad, block, s: torch.Tensor, lam: float = LAMBDA) -> torch.Tensor:
    """(G,) D at the sparsities ``s`` of an (out, in) weight with gradient signal ``grad``."""
    return at_grid(tile_curve(weight, grad, block, lam).distortion(), s)


def cost_curve(curve: TileCurve, model: str, tokens: float, s: torch.Tensor) -> torch.Tensor:
    """(G,) cost of the surviving blocks at sparsities ``s``: ``flops`` (weights x tokens) or ``blocks``."""
    if model == "flops":
        per_tile = (curve.numel - curve.removed) * tokens
    elif model == "blocks":
        per_tile = curve.tiles - torch.arange(curve.tiles + 1, dtype=torch.float64)
    else:
        raise ValueError(f"unknown cost model {model!r}")
    return at_grid(per_tile, s)


def smooth(y: torch.Tensor, width: int) -> torch.Tensor:
    """Centred moving average over 2 * width + 1 grid points (edges averaged over what exists)."""
    if width <= 0:
        return y
    k = torch.ones(1, 1, 2 * width + 1, dtype=y.dtype)
    num = F.conv1d(F.pad(y[None, None], (width, width)), k)[0, 0]
    den = F.conv1d(F.pad(torch.ones_like(y)[None, None], (width, width)), k)[0, 0]
    return num / den  # (G,)


def slope(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(G,) finite-difference derivative dy/ds (central inside, one-sided at the ends)."""
    d = torch.empty_like(y)
    d[1:-1] = (y[2:] - y[:-2]) / (s[2:] - s[:-2])
    d[0] = (y[1] - y[0]) / (s[1] - s[0])
    d[-1] = (y[-1] - y[-2]) / (s[-1] - s[-2])
    return d
