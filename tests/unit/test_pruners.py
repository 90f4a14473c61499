"""Pruners against brute-force references, and the quality ordering on correlated inputs."""
from __future__ import annotations

import pytest
import torch

from sparsify.calibrate.stats import ColumnNorm, Hessian
from sparsify.config import Scheme
from sparsify.pruners import magnitude, sparsegpt, wanda
from sparsify.pruners.masks import block_mask
from sparsify.registry import PRUNERS

UNSTR, NM24, NM48, DENSE = (Scheme.parse(s) for s in ("unstructured", "2:4", "4:8", "dense"))
SGPT = sparsegpt.SparseGPTConfig


def _correlated(tokens=512, inp=64, seed=0):
    """X = Z A + noise (low-rank, correlated columns) with a few large outlier features."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, 16, generator=g) @ torch.randn(16, inp, generator=g)
    X = X + 0.1 * torch.randn(tokens, inp, generator=g)  # (tokens, in)
    X[:, :3] *= 20  # a few outlier features, as in LLM activations
    return X


def _weight(out, inp, seed):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def _stats(X):
    h, c = Hessian(X.shape[1]), ColumnNorm(X.shape[1])
    h.add_batch(X)
    c.add_batch(X)
    return h, c


def _keep_loop(values, n_drop):
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    drop = set(order[:n_drop])
    return [i not in drop for i in range(len(values))]


def _expected_keep(score, scheme, s, per):
    """Brute-force keep-mask for a score matrix (loops over rows / groups / the flat layer)."""
    out, inp = score.shape
    if scheme.kind == "nm":
        m = scheme.m
        return torch.tensor([sum((_keep_loop(score[r, g:g + m].tolist(), m - scheme.n) for g in range(0, inp, m)), [])
                             for r in range(out)])
    if per == "row":
        return torch.tensor([_keep_loop(score[r].tolist(), int(inp * s)) for r in range(out)])
    return torch.tensor(_keep_loop(score.flatten().tolist(), int(score.numel() * s))).view(out, inp)


def test_registry():
    assert PRUNERS["magnitude"].stats is None and PRUNERS["wanda"].stats == "colnorm"
    assert PRUNERS["sparsegpt"].stats == "hessian" and PRUNERS["sparsegpt"].joint_quant
    assert not PRUNERS["wanda"].joint_quant and PRUNERS["sparsegpt"].config_cls is SGPT


@pytest.mark.parametrize("scheme,s,per", [(UNSTR, 0.5, "row"), (UNSTR, 0.3, "layer"), (NM24, 0.0, "row"),
                                          (NM48, 0.0, "row")])
@pytest.mark.parametrize("seed", [0, 1])
def test_magnitude_and_wanda_equal_brute_force(scheme, s, per, seed):
    W, X = _weight(6, 16, seed), _correlated(64, 16, seed)
    _, c = _stats(X)
    norms = [(sum(X[t, j].item() ** 2 for t in range(X.shape[0])) / X.shape[0]) ** 0.5 for j in range(16)]
    wanda_score = torch.tensor([[abs(W[i, j].item()) * norms[j] for j in range(16)] for i in range(6)])
    for fn, stats, score in [(magnitude.prune, None, W.abs()), (wanda.prune, c, wanda_score)]:
        out = fn(W, stats, scheme, s, per, None)
        assert torch.equal(out != 0, _expected_keep(score, scheme, s, per))
        assert torch.equal(out[out != 0], W[out != 0])  # no weight update
        assert not torch.signbit(out[out == 0]).any()


def test_block_and_dense_schemes_for_magnitude_and_wanda():
    W, X = _weight(10, 24, 2), _correlated(64, 24, 2)
    _, c = _stats(X)
    block = Scheme.parse("block:4x8")
    assert torch.equal(magnitude.prune(W, None, block, 0.5, "row", None) != 0, block_mask(W.abs(), (4, 8), 0.5))
    assert torch.equal(wanda.prune(W, c, block, 0.5, "row", None) != 0,
                       block_mask(W.abs() * c.norms()[None, :], (4, 8), 0.5))
    assert torch.equal(magnitude.prune(W, None, DENSE, 0.5, "row", None), W)


def _sparsegpt_reference(W, H, damp, scheme, sparsity, per="row", quantize=None):
    """Column-by-column OBS with an explicit inverse Hessian, no blocking: after each column the inverse
    Hessian of the remaining columns is the Schur complement (eliminate the column's row/col)."""
    W, n = W.double().clone(), W.shape[1]
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    diag_steps, Hi = [], Hinv.clone()  # diag of Hinv at the step where each column is eliminated = U_cc^2
    for c in range(n):
        diag_steps.append(Hi[c, c].item())
        Hi = Hi - torch.outer(Hi[:, c], Hi[c, :]) / Hi[c, c]
    d = torch.tensor(diag_steps, dtype=torch.float64)
    prune = torch.zeros_like(W, dtype=torch.bool)
    if scheme.kind == "unstructured":
        prune = ~_expected_keep(W ** 2 / d[None, :], scheme, sparsity, per)
    for c in range(n):
        if scheme.kind == "nm" and c % scheme.m == 0:
            score = W[:, c:c + scheme.m] ** 2 / d[c:c + scheme.m][None, :]
            prune[:, c:c + scheme.m] = ~_expected_keep(score, scheme, 0.0, "row")
        q = torch.where(prune[:, c], 0.0, W[:, c])
        if quantize is not None:
            q = torch.where(prune[:, c], 0.0, quantize(q.float(), c).double())
        err = (W[:, c] - q) / Hinv[c, c]
        W[:, c + 1:] -= torch.outer(err, Hinv[c, c + 1:])
        W[:, c] = q
        Hinv = Hinv - torch.outer(Hinv[:, c], Hinv[c, :]) / Hinv[c, c]
    return W.float()


@pytest.mark.parametrize("scheme,per", [(UNSTR, "row"), (UNSTR, "layer"), (NM24, "row"), (NM48, "row")])
@pytest.mark.parametrize("seed", [1, 2])
def test_sparsegpt_equals_slow_reference(scheme, per, seed):
    X, W = _correlated(256, 32, seed=seed), _weight(5, 32, seed)
    X[:, 7] = 0  # one dead input
    h, _ = _stats(X)
    ref = _sparsegpt_reference(W, h.H, 0.01, scheme, 0.5, per)
    # one block == no blocking; N:M masks do not depend on the block size, so lazy blocks must agree too
    for bs in (32, 8, 6) if scheme.kind == "nm" else (32,):
        got = sparsegpt.prune(W, h, scheme, 0.5, per, SGPT(damp=0.01, blocksize=bs))
        assert torch.equal(got == 0, ref == 0), bs
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("scheme,s,per", [(UNSTR, 0.3, "row"), (UNSTR, 0.7, "layer"), (NM24, 0.0, "row"),
                                          (Scheme.parse("block:4x8"), 0.4, "row")])
def test_sparsegpt_exact_counts_across_blocks(scheme, s, per):
    X, W = _correlated(256, 40, seed=4), _weight(12, 40, 4)
    h, _ = _stats(X)
    out = sparsegpt.prune(W, h, scheme, s, per, SGPT(blocksize=12))  # blocks of 12, 12, 12, 4 columns
    drop = out == 0
    if scheme.kind == "nm":
        assert (drop.view(12, -1, 4).sum(-1) == 2).all()
    elif scheme.kind == "block":
        assert drop.sum().item() == 4 * 8 * int(15 * s)  # 3 x 5 tiles of 4x8
        assert (drop.view(3, 4, 5, 8).all((1, 3)) | ~drop.view(3, 4, 5, 8).any((1, 3))).all()  # whole tiles
    elif per == "row":
        assert (drop.sum(1) == int(40 * s)).all()
    else:
        assert drop.sum().item() == int(12 * 40 * s)
    assert not torch.signbit(out[drop]).any()


def test_sparsegpt_block_scheme_mask_and_reconstruction():
    X, W = _correlated(512, 32, seed=5), _weight(16, 32, 5)
    h, _ = _stats(X)
    scheme = Scheme.parse("block:4x4")
    U, _ = h.factor(0.01)
    got = sparsegpt.prune(W, h, scheme, 0.5, "row", SGPT(blocksize=8))
    assert torch.equal(got != 0, block_mask((W / torch.diag(U)[None, :]) ** 2, (4, 4), 0.5))
    err = lambda V: (X @ (W - V).T).norm().item()  # noqa: E731
    assert err(got) < err(W * (got != 0))  # the OBS update beats keeping the same weights unchanged


def test_sparsegpt_dense_scheme():
    X, W = _correlated(128, 16, seed=6), _weight(4, 16, 6)
    h, _ = _stats(X)
    assert torch.equal(sparsegpt.prune(W, h, DENSE, 0.5, "row", SGPT()), W)
    grid = lambda w, c: torch.round(w / 0.05) * 0.05  # noqa: E731
    gptq = sparsegpt.prune(W, h, DENSE, 0.5, "row", SGPT(), quantize=grid)  # dense + quantize = GPTQ
    torch.testing.assert_close(gptq, _sparsegpt_reference(W, h.H, 0.01, DENSE, 0.0, quantize=grid),
                               rtol=1e-3, atol=1e-3)


def test_sparsegpt_joint_quantization_hook():
    X, W = _correlated(256, 32, seed=2), _weight(5, 32, 2)
    h, _ = _stats(X)
    step = 0.05
    grid = lambda w, c: torch.round(w / step) * step  # noqa: E731
    for scheme in (NM24, UNSTR):
        joint = sparsegpt.prune(W, h, scheme, 0.5, "row", SGPT(), quantize=grid)
        ref = _sparsegpt_reference(W, h.H, 0.01, scheme, 0.5, quantize=grid)
        torch.testing.assert_close(joint, ref, rtol=1e-3, atol=1e-3)
        assert torch.allclose(joint / step, torch.round(joint / step), atol=1e-4)  # on the grid where kept
        after = grid(sparsegpt.prune(W, h, scheme, 0.5, "row", SGPT()), 0)
        err = lambda V: (X @ (W - V).T).norm()  # noqa: E731
        assert err(joint) < err(after)


def test_inputs_are_not_mutated_and_dead_inputs_zeroed():
    X, W = _correlated(128, 16), _weight(3, 16, 7)
    X[:, 5] = 0
    h, c = _stats(X)
    W0, H0 = W.clone(), h.H.clone()
    out = sparsegpt.prune(W, h, UNSTR, 0.25, "row", SGPT())
    assert (out[:, 5] == 0).all()
    wanda.prune(W, c, NM24, 0.0, "row", None)
    assert torch.equal(W, W0) and torch.equal(h.H, H0)


@pytest.mark.parametrize("scheme", [UNSTR, NM24])
@pytest.mark.parametrize("seed", [3, 8])
def test_quality_ordering_on_correlated_inputs(scheme, seed):
    X, W = _correlated(1024, 64, seed=seed), _weight(48, 64, seed)
    h, c = _stats(X)
    err = lambda V: (X @ (W - V).T).norm().item()  # noqa: E731
    e_mag = err(magnitude.prune(W, None, scheme, 0.5, "row", None))
    e_wanda = err(wanda.prune(W, c, scheme, 0.5, "row", None))
    e_sgpt = err(sparsegpt.prune(W, h, scheme, 0.5, "row", SGPT()))
    assert e_sgpt < e_wanda < e_mag, (e_sgpt, e_wanda, e_mag)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_keeps_dtype_and_pattern(dtype):
    X, W = _correlated(128, 32), _weight(8, 32, 9).to(dtype)
    h, c = _stats(X.to(dtype))
    for out in (magnitude.prune(W, None, NM24, 0, "row", None), wanda.prune(W, c, NM24, 0, "row", None),
                sparsegpt.prune(W, h, NM24, 0, "row", SGPT())):
        assert out.dtype == dtype
        assert ((out != 0).view(8, -1, 4).sum(-1) <= 2).all()
        assert not torch.signbit(out[out == 0]).any()


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_joint_int4_beats_prune_then_round(seed):
    from sparsify.quant import rtn
    from sparsify.quant.spec import QuantSpec

    X, W = _correlated(1024, 64, seed=seed), _weight(32, 64, seed)
    h, _ = _stats(X)
    qspec = QuantSpec.parse("int4", 0)
    quantizer = rtn.column_quantizer(sparsegpt.prune(W, h, NM24, 0.0, "row", SGPT()), qspec)  # as the pipeline
    joint = rtn.snap(sparsegpt.prune(W, h, NM24, 0.0, "row", SGPT(), quantize=quantizer), quantizer.params)
    after, _ = rtn.fake_quantize(sparsegpt.prune(W, h, NM24, 0.0, "row", SGPT()), qspec)
    assert torch.equal(joint, rtn.snap(joint, quantizer.params))  # on the grid
    err = lambda V: (X @ (W - V).T).norm().item()  # noqa: E731
    assert err(joint) < err(after)
