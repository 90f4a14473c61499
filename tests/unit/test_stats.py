"""Accumulators against direct computation on the concatenated inputs."""
from __future__ import annotations

import torch

from sparsify.calibrate.stats import ColumnNorm, Hessian


def _batches():
    return [torch.randn(2, 5, 12) for _ in range(3)] + [torch.randn(7, 12)]


def test_column_norm_and_merge():
    xs = _batches()
    X = torch.cat([x.reshape(-1, 12) for x in xs])
    a, b, c = ColumnNorm(12), ColumnNorm(12), ColumnNorm(12)
    for i, x in enumerate(xs):
        a.add_batch(x)
        (b if i % 2 else c).add_batch(x)
    b.merge(c)
    torch.testing.assert_close(a.norms(), X.norm(dim=0) / X.shape[0] ** 0.5)
    torch.testing.assert_close(b.norms(), a.norms())


def test_hessian_matches_direct_and_factor_inverts():
    xs = _batches()
    X = torch.cat([x.reshape(-1, 12) for x in xs]).double()
    h, p, q = Hessian(12), Hessian(12), Hessian(12)
    for i, x in enumerate(xs):
        h.add_batch(x)
        (p if i % 2 else q).add_batch(x)
    p.merge(q)
    H = 2 / X.shape[0] * X.T @ X
    torch.testing.assert_close(h.H.double(), H, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.H, h.H, rtol=1e-5, atol=1e-6)
    U, dead = h.factor(0.01)
    assert not dead.any() and h.damp_used == 0.01 and not h.fallback
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close((U.T.double() @ U.double()), torch.linalg.inv(Hd), rtol=1e-3, atol=1e-4)
    assert h.factor(0.01)[0] is U  # memoised: shared layers factor once


def test_dead_inputs_and_fallback():
    h = Hessian(6)
    x = torch.randn(20, 6)
    x[:, 2] = 0
    h.add_batch(x)
    U, dead = h.factor(0.01)
    assert dead.tolist() == [False, False, True, False, False, False] and torch.isfinite(U).all()
    bad = Hessian(4)
    bad.add_batch(torch.randn(3, 4))
    bad.H[0, 0] = float("nan")
    U, _ = bad.factor(0.01)
    assert bad.fallback and torch.equal(U, torch.eye(4))
