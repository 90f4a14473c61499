"""Pruners against brute-force references, and the quality ordering on correlated inputs."""
from __future__ import annotations

import pytest
import torch

from sparsify.calibrate.stats import ColumnNorm, Hessian
from sparsify.config import Scheme
from sparsify.pruners import magnitude, sparsegpt, wanda

UNSTR, NM24, NM48 = Scheme.parse("unstructured"), Scheme.parse("2:4"), Scheme.parse("4:8")


def _correlated(tokens=512, inp=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, 16, generator=g) @ torch.randn(16, inp, generator=g) + 0.1 * torch.randn(tokens, inp, generator=g)
    X[:, :3] *= 20  # a few outlier features, as in LLM activations
    return X


def _stats(X):
    h, c = Hessian(X.shape[1]), ColumnNorm(X.shape[1])
    h.add_batch(X)
    c.add_batch(X)
    return h, c


def _keep_loop(score_row, n_drop):
    order = sorted(range(len(score_row)), key=lambda i: (score_row[i], i))
    return [i not in set(order[:n_drop]) for i in range(len(score_row))]


def test_magnitude_and_wanda_equal_brute_force():
    W, X = torch.randn(6, 16), _correlated(64, 16)
    _, c = _stats(X)
    norms = (X.pow(2).sum(0) / X.shape[0]).sqrt()
    for fn, stats, score in [(magnitude.prune, None, W.abs()), (wanda.prune, c, W.abs() * norms)]:
        out = fn(W, stats, UNSTR, 0.5, "row", None)
        for r in range(6):
            keep = _keep_loop(score[r].tolist(), 8)
            assert [bool(v) for v in (out[r] != 0)] == keep
        out = fn(W, stats, NM24, 0.0, "row", None)
        for r in range(6):
            for g in range(4):
                keep = _keep_loop(score[r, 4 * g:4 * g + 4].tolist(), 2)
                assert [bool(v) for v in (out[r, 4 * g:4 * g + 4] != 0)] == keep


def _sparsegpt_reference(W, H, damp, scheme, sparsity, quantize=None):
    """Column-by-column OBS with an explicit inverse Hessian, eliminated by Schur complements."""
    W, n = W.double().clone(), W.shape[1]
    H = H.double().clone()
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    diag_steps, Hi = [], Hinv.clone()  # diag of Hinv at the step where each column is eliminated
    for c in range(n):
        diag_steps.append(Hi[c, c].item())
        Hi = Hi - torch.outer(Hi[:, c], Hi[c, :]) / Hi[c, c]
    d = torch.tensor(diag_steps, dtype=torch.float64)
    prune = torch.zeros_like(W, dtype=torch.bool)
    if scheme.kind == "unstructured":
        score = W ** 2 / d[None, :]
        for r in range(W.shape[0]):
            prune[r] = ~torch.tensor(_keep_loop(score[r].tolist(), int(n * sparsity)))
    for c in range(n):
        if scheme.kind == "nm" and c % scheme.m == 0:
            score = W[:, c:c + scheme.m] ** 2 / d[c:c + scheme.m][None, :]  # as SparseGPT: U_cc^2
            for r in range(W.shape[0]):
                prune[r, c:c + scheme.m] = ~torch.tensor(_keep_loop(score[r].tolist(), scheme.m - scheme.n))
        q = torch.where(prune[:, c], 0.0, W[:, c])
        if quantize is not None:
            q = quantize(q.float(), c).double()
        err = (W[:, c] - q) / Hinv[c, c]
        W[:, c + 1:] -= torch.outer(err, Hinv[c, c + 1:])
        W[:, c] = q
        Hinv = Hinv - torch.outer(Hinv[:, c], Hinv[c, :]) / Hinv[c, c]
    return W.float()


@pytest.mark.parametrize("scheme", [UNSTR, NM24, NM48])
def test_sparsegpt_equals_slow_reference(scheme):
    X, W = _correlated(256, 32, seed=1), torch.randn(5, 32)
    h, _ = _stats(X)
    ref = _sparsegpt_reference(W, h.H, 0.01, scheme, 0.5)
    # one block, and lazy block updates (unstructured masks are chosen per block, so only N:M can match there)
    for bs in (32, 8) if scheme.kind == "nm" else (32,):
        got = sparsegpt.prune(W, h, scheme, 0.5, "row", sparsegpt.SparseGPTConfig(damp=0.01, blocksize=bs))
        assert torch.equal(got == 0, ref == 0)
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


def test_sparsegpt_joint_quantization_hook():
    X, W = _correlated(256, 32, seed=2), torch.randn(5, 32)
    h, _ = _stats(X)
    step = 0.05
    grid = lambda w, c: torch.round(w / step) * step  # noqa: E731
    cfg = sparsegpt.SparseGPTConfig()
    joint = sparsegpt.prune(W, h, NM24, 0.0, "row", cfg, quantize=grid)
    torch.testing.assert_close(joint, _sparsegpt_reference(W, h.H, 0.01, NM24, 0.0, grid), rtol=1e-3, atol=1e-3)
    assert torch.allclose(joint / step, torch.round(joint / step), atol=1e-4)  # on the grid
    after = grid(sparsegpt.prune(W, h, NM24, 0.0, "row", cfg), 0)
    err = lambda V: (X @ (W - V).T).norm()  # noqa: E731
    assert err(joint) < err(after)


def test_dead_inputs_are_zeroed():
    X, W = _correlated(128, 16), torch.randn(3, 16)
    X[:, 5] = 0
    h, _ = _stats(X)
    out = sparsegpt.prune(W, h, UNSTR, 0.25, "row", sparsegpt.SparseGPTConfig())
    assert (out[:, 5] == 0).all()


@pytest.mark.parametrize("scheme", [UNSTR, NM24])
def test_quality_ordering_on_correlated_inputs(scheme):
    X, W = _correlated(1024, 64, seed=3), torch.randn(48, 64)
    h, c = _stats(X)
    err = lambda V: (X @ (W - V).T).norm().item()  # noqa: E731
    e_mag = err(magnitude.prune(W, None, scheme, 0.5, "row", None))
    e_wanda = err(wanda.prune(W, c, scheme, 0.5, "row", None))
    e_sgpt = err(sparsegpt.prune(W, h, scheme, 0.5, "row", sparsegpt.SparseGPTConfig()))
    assert e_sgpt < e_wanda < e_mag, (e_sgpt, e_wanda, e_mag)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_keeps_dtype_and_pattern(dtype):
    X, W = _correlated(128, 32), torch.randn(8, 32).to(dtype)
    h, c = _stats(X)
    for out in (wanda.prune(W, c, NM24, 0, "row", None),
                sparsegpt.prune(W, h, NM24, 0, "row", sparsegpt.SparseGPTConfig())):
        assert out.dtype == dtype
        assert ((out != 0).view(8, -1, 4).sum(-1) <= 2).all()


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_joint_int4_beats_prune_then_round(seed):
    from sparsify.quant import rtn
    from sparsify.quant.spec import QuantSpec

    X, W = _correlated(1024, 64, seed=seed), torch.randn(32, 64)
    h, _ = _stats(X)
    qspec = QuantSpec.parse("int4", 0)
    cfg = sparsegpt.SparseGPTConfig()
    quantizer = rtn.column_quantizer(sparsegpt.prune(W, h, NM24, 0.0, "row", cfg), qspec)  # as the pipeline does
    joint = rtn.snap(sparsegpt.prune(W, h, NM24, 0.0, "row", cfg, quantize=quantizer), quantizer.params)
    after, _ = rtn.fake_quantize(sparsegpt.prune(W, h, NM24, 0.0, "row", cfg), qspec)
    assert torch.equal(joint, rtn.snap(joint, quantizer.params))  # on the grid
    err = lambda V: (X @ (W - V).T).norm().item()  # noqa: E731
    assert err(joint) < err(after)
