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


def add_gram_upper_(S: torch.Tensor, x: torch.Tensor, width: int | None = None) -> None:
    """S += the upper triangle of x^T x, in bands of ``width`` rows: no band computes the blocks left of
    its diagonal, about 0.6x the work of the full product. Default width: 128 up to 1024 inputs, 256
    above (the faster of 96-512 at 576 and 1536 inputs, 4096 tokens, measured on 2 cores).

    S (in, in) keeps whatever its lower triangle held; only ``S.triu()`` is meaningful.
    """
    n = x.shape[1]
    width = width or (128 if n <= 1024 else 256)
    for i0 in range(0, n, width):
        i1 = min(i0 + width, n)
        S[i0:i1, i0:].addmm_(x[:, i0:i1].T, x[:, i0:])  # (band, in - i0)


class Hessian:
    """SparseGPT's H = (2/n) sum_t x_t x_t^T over n tokens, and its damped inverse factor.

    Accumulates the raw sum's upper triangle (`add_gram_upper_`); ``H`` symmetrises and scales it
    when read. ``factor(damp)`` is memoised per damping value, so layers that read the same input
    (q/k/v, gate/up) share one accumulator and one factorisation. Callers must not mutate the results.
    """

    def __init__(self, in_features: int, device=None):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)  # (in, in) upper
        self.tokens = 0
        self._H: torch.Tensor | None = None
        self._factors: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        self.damp_used: float | None = None
        self.fallback = False

    @property
    def H(self) -> torch.Tensor:
        if self._H is None:
            self._H = self._symmetric()
        return self._H

    def _symmetric(self) -> torch.Tensor:
        """(in, in) the symmetrised, scaled sum, built in one new matrix plus one temporary."""
        H = self.sum.triu()  # (in, in)
        H.add_(self.sum.triu(1).T)
        return H.mul_(2.0 / max(1, self.tokens))

    @H.setter
    def H(self, value: torch.Tensor) -> None:
        self._H = value
        self._factors.clear()

    def _changed(self) -> None:
        self._H = None
        self._factors.clear()

    def add_batch(self, x: torch.Tensor) -> None:
        x = _tokens(x, self.sum.shape[0]).to(self.sum.device)  # (tokens, in)
        add_gram_upper_(self.sum, x)
        self.tokens += x.shape[0]
        self._changed()

    def merge(self, other: Hessian) -> None:
        self.sum += other.sum.triu().to(self.sum.device)
        self.tokens += other.tokens
        self._changed()

    def reduce(self, all_reduce) -> None:
        """Sum the raw sums and token counts of every process."""
        self.sum.triu_()  # (in, in) what lies below the diagonal is not part of the sum
        all_reduce(self.sum, "sum")
        self.tokens = int(all_reduce(torch.tensor(self.tokens, dtype=torch.int64), "sum"))
        self._changed()

    def factor(self, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, dead): U upper Cholesky factor of (H + damping)^-1, dead the inputs that never fired.

        If Cholesky fails the damping is raised tenfold (up to 4 times), then U falls back to the
        identity (plain magnitude-order pruning, no update) instead of crashing.
        """
        if damp not in self._factors:
            H = self._H if self._H is not None else self._symmetric()  # (in, in), not kept
            diag = torch.diag(H).clone()  # (in,)
            dead = diag == 0
            diag[dead] = 1.0
            mean_diag = diag.mean()
            L, d = None, damp
            for _ in range(5):
                # With J the order reversal and L the lower Cholesky factor of J Hd J, U = J L^-1 J is
                # upper and U^T U = Hd^-1: one factorisation and one triangular inverse. Each (in, in)
                # temporary is freed as soon as it is used: at most four such matrices live at once.
                A = H.flip(0, 1)  # (in, in) J H J, a copy
                A.diagonal().copy_((diag + d * mean_diag).flip(0))
                L, info = torch.linalg.cholesky_ex(A)
                del A
                if int(info) == 0 and torch.isfinite(L).all():
                    break
                L, d = None, d * 10
            del H
            U = None
            if L is not None:
                eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
                Linv = torch.linalg.solve_triangular(L, eye, upper=False)
                del L, eye
                U = Linv.flip(0, 1)  # (in, in) upper
                del Linv
                if not torch.isfinite(U).all():
                    U = None
            self.fallback = U is None
            self.damp_used = None if U is None else d
            if U is None:
                U = torch.eye(self.sum.shape[0], dtype=self.sum.dtype, device=self.sum.device)
            self._factors[damp] = (U, dead)
        return self._factors[damp]

    def normalized_inverse(self, damp: float, rho: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, A, inv) for ADMM: n = sqrt(diag H) (0 for inputs that never fired), A = H scaled to a unit
        diagonal (n_i = 0: a unit row) plus ``damp`` I, inv = (A + rho I)^-1. Memoised like `factor`."""
        key = ("admm", damp, rho)
        if key not in self._factors:
            H = self.H  # (in, in)
            n = torch.diag(H).clamp(min=0).sqrt()  # (in,)
            safe = torch.where(n > 0, n, torch.ones_like(n))
            A = H / safe[:, None] / safe[None, :]  # (in, in)
            A.diagonal().copy_(torch.where(n > 0, A.diagonal(), torch.ones_like(n)) + damp)
            L = torch.linalg.cholesky(A + rho * torch.eye(A.shape[0], dtype=A.dtype, device=A.device))
            self._factors[key] = (n, A, torch.cholesky_inverse(L))
        return self._factors[key]


ACCUMULATORS["colnorm"] = ColumnNorm
ACCUMULATORS["hessian"] = Hessian
