"""Per-layer statistics accumulators: ``add_batch(x)`` with x (..., in), then read the result.

Registered in `sparsify.tables.ACCUMULATORS`. Everything accumulates in float32; ``merge`` sums
two accumulators in one process, ``reduce(all_reduce)`` combines the accumulators of every process
of a data-parallel run (`sparsify.calibrate.distributed`).
"""
from __future__ import annotations

import torch

from sparsify.tables import ACCUMULATORS


def _tokens(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x (..., in) any float dtype -> (tokens, in) fp32; a wrong width is a caller bug (ValueError)."""
    if x.shape[-1] != in_features:
        raise ValueError(f"accumulator for {in_features} inputs got a batch of width {x.shape[-1]}")
    return x.reshape(-1, in_features).float()


class ColumnNorm:
    """Wanda's input-column norms: sqrt(sum_t x_tj^2 / tokens), i.e. ||X_:,j||_2 / sqrt(tokens)
    (the constant factor does not change any ranking)."""

    def __init__(self, in_features: int, device=None):
        self.sumsq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = _tokens(x, self.sumsq.shape[0])  # (tokens, in)
        self.sumsq += (x * x).sum(0).to(self.sumsq.device)
        self.tokens += x.shape[0]

    def merge(self, other: ColumnNorm) -> None:
        self.sumsq += other.sumsq.to(self.sumsq.device)
        self.tokens += other.tokens

    def reduce(self, all_reduce) -> None:
        """Sum the squares and token counts of every process (``all_reduce(tensor, op)`` in place)."""
        all_reduce(self.sumsq, "sum")  # (in,)
        self.tokens = int(all_reduce(torch.tensor(self.tokens, dtype=torch.int64), "sum"))

    def norms(self) -> torch.Tensor:
        return (self.sumsq / max(1, self.tokens)).sqrt()  # (in,)


class Hessian:
    """SparseGPT's H = (2/n) sum_t x_t x_t^T as a running average, and its damped inverse factor.

    ``factor(damp)`` is memoised per damping value, so layers that read the same input (q/k/v,
    gate/up) share one accumulator and one factorisation. Callers must not mutate the results.
    """

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0
        self._factors: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        self.damp_used: float | None = None
        self.fallback = False

    def add_batch(self, x: torch.Tensor) -> None:
        x = _tokens(x, self.H.shape[0]).to(self.H.device)  # (tokens, in)
        if x.shape[0] == 0:
            return
        total = self.tokens + x.shape[0]
        self.H *= self.tokens / total
        x = x * (2.0 / total) ** 0.5
        self.H += x.T @ x  # (in, in)
        self.tokens = total
        self._factors.clear()

    def merge(self, other: Hessian) -> None:
        total = self.tokens + other.tokens
        self.H = (self.H * self.tokens + other.H.to(self.H.device) * other.tokens) / max(1, total)
        self.tokens = total
        self._factors.clear()

    def reduce(self, all_reduce) -> None:
        """Every process's running average, weighted by its tokens, into the average over all tokens."""
        total = int(all_reduce(torch.tensor(self.tokens, dtype=torch.int64), "sum"))
        self.H *= self.tokens  # (in, in) = 2 sum_t x_t x_t^T of this process's tokens
        all_reduce(self.H, "sum")
        self.H /= max(1, total)
        self.tokens = total
        self._factors.clear()

    def factor(self, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, dead): U upper Cholesky factor of (H + damping)^-1, dead the inputs that never fired.

        If Cholesky fails the damping is raised tenfold (up to 4 times), then U falls back to the
        identity (plain magnitude-order pruning, no update) instead of crashing.
        """
        if damp not in self._factors:
            H = self.H.clone()
            dead = torch.diag(H) == 0  # (in,)
            H[dead, dead] = 1.0
            eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
            mean_diag = torch.diag(H).mean()
            U, d = None, damp
            for _ in range(5):
                L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
                if int(info) == 0 and torch.isfinite(L).all():
                    Hinv = torch.cholesky_inverse(L)
                    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                    if int(info) == 0 and torch.isfinite(U).all():
                        break
                    U = None
                d *= 10
            self.fallback = U is None
            self.damp_used = None if U is None else d
            self._factors[damp] = (eye if U is None else U, dead)
        return self._factors[damp]


ACCUMULATORS["colnorm"] = ColumnNorm
ACCUMULATORS["hessian"] = Hessian
