"""Accumulators against direct computation on the concatenated inputs."""
from __future__ import annotations

import pytest
import torch

from sparsify.calibrate.stats import ColumnNorm, Hessian, add_gram_upper_
from sparsify.registry import ACCUMULATORS


def _batches(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, 5, 12, generator=g) for _ in range(3)] + [torch.randn(7, 12, generator=g)]
    return [x.to(dtype) for x in xs]


def _split_accumulate(cls, xs):
    """One accumulator over all batches, and two over alternating batches merged afterwards."""
    whole, p, q = cls(12), cls(12), cls(12)
    for i, x in enumerate(xs):
        whole.add_batch(x)
        (p if i % 2 else q).add_batch(x)
    p.merge(q)
    return whole, p


def test_registered():
    assert ACCUMULATORS["colnorm"] is ColumnNorm and ACCUMULATORS["hessian"] is Hessian


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_column_norm_and_merge(dtype):
    xs = _batches(1, dtype)
    X = torch.cat([x.reshape(-1, 12) for x in xs]).double()  # (tokens, in)
    whole, merged = _split_accumulate(ColumnNorm, xs)
    assert whole.tokens == merged.tokens == X.shape[0] and whole.norms().dtype == torch.float32
    torch.testing.assert_close(whole.norms().double(), X.norm(dim=0) / X.shape[0] ** 0.5)
    torch.testing.assert_close(merged.norms(), whole.norms())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hessian_matches_direct_and_merge(dtype):
    xs = _batches(2, dtype)
    X = torch.cat([x.reshape(-1, 12) for x in xs]).double()  # (tokens, in)
    whole, merged = _split_accumulate(Hessian, xs)
    H = 2 / X.shape[0] * X.T @ X  # (in, in)
    assert whole.H.dtype == torch.float32 and merged.tokens == X.shape[0]
    torch.testing.assert_close(whole.H.double(), H, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.H, whole.H, rtol=1e-5, atol=1e-6)


def test_empty_batches_and_wrong_width():
    h, c = Hessian(4), ColumnNorm(4)
    for acc in (h, c):
        acc.add_batch(torch.zeros(0, 4))
        assert acc.tokens == 0
        with pytest.raises(ValueError, match="width"):
            acc.add_batch(torch.randn(3, 5))
    assert torch.isfinite(h.H).all() and torch.isfinite(c.norms()).all()
    x = torch.randn(6, 4)
    h.add_batch(x)
    torch.testing.assert_close(h.H, 2 / 6 * x.T @ x)


def test_factor_inverts_damped_hessian_and_is_memoised():
    xs = _batches(3)
    h = Hessian(12)
    for x in xs:
        h.add_batch(x)
    H = h.H.double()
    U, dead = h.factor(0.01)
    assert not dead.any() and h.damp_used == 0.01 and not h.fallback
    assert torch.equal(U, torch.triu(U))  # upper triangular
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(U.T.double() @ U.double(), torch.linalg.inv(Hd), rtol=1e-4, atol=1e-5)
    assert h.factor(0.01)[0] is U  # memoised: layers sharing the input factor once
    assert h.factor(0.1)[0] is not U
    h.add_batch(xs[0])  # new data invalidates the cache
    assert h.factor(0.01)[0] is not U


def test_dead_inputs():
    h = Hessian(6)
    x = torch.randn(20, 6)
    x[:, 2] = 0
    h.add_batch(x)
    U, dead = h.factor(0.01)
    assert dead.tolist() == [False, False, True, False, False, False] and torch.isfinite(U).all()
    H = h.H.double().clone()
    H[2, 2] = 1.0
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(U.T.double() @ U.double(), torch.linalg.inv(Hd), rtol=1e-4, atol=1e-5)
    assert h.H[2, 2] == 0  # the accumulator itself is not modified


def test_damping_is_raised_until_cholesky_succeeds():
    h = Hessian(2)
    h.H = torch.tensor([[1.0, 0.0], [0.0, -0.5]])  # indefinite: needs damp * mean(diag) > 0.5
    h.tokens = 1
    U, _ = h.factor(0.01)
    assert h.damp_used == pytest.approx(10.0) and not h.fallback  # 0.01 -> 0.1 -> 1 -> 10
    Hd = h.H.double() + 10.0 * 0.25 * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(U.T.double() @ U.double(), torch.linalg.inv(Hd), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("poison", ["nan", "inf", "negative"])
def test_hopeless_hessian_falls_back_to_identity(poison):
    bad = Hessian(4)
    bad.add_batch(torch.randn(3, 4))
    bad.H[0, 0] = {"nan": float("nan"), "inf": float("inf"), "negative": -1e12}[poison]
    U, _ = bad.factor(0.01)
    assert bad.fallback and bad.damp_used is None and torch.equal(U, torch.eye(4))


@pytest.mark.parametrize("n,width", [(1, 256), (7, 3), (257, 256), (600, 256), (64, 64), (300, None), (1100, None)])
def test_banded_upper_gram_equals_the_full_product(n, width):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(33, n, generator=g)
    S = torch.zeros(n, n)
    add_gram_upper_(S, x, width)
    add_gram_upper_(S, x, width)
    ref = 2 * (x.double().T @ x.double())
    torch.testing.assert_close(S.triu().double(), ref.triu(), rtol=1e-5, atol=1e-4)
