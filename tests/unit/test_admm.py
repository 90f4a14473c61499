"""ADMM: the fixed-mask solve equals the per-row least-squares optimum, the gradual masks end on the
exact pattern, quality against SparseGPT, joint quantization on the grid."""
from __future__ import annotations

import pytest
import torch

from sparsify.calibrate.stats import Hessian
from sparsify.config import Scheme
from sparsify.pruners import admm, sparsegpt, wanda
from sparsify.pruners.masks import mask_for

from test_pruners import _correlated, _expected_keep, _stats, _weight

UNSTR, NM24 = Scheme.parse("unstructured"), Scheme.parse("2:4")


def _least_squares(W, H, keep, damp):
    """Per row, the exact minimiser of (w - v)^T Hd (w - v) over v supported on keep, Hd = H + damp diag(H)."""
    Hd = H.double() + damp * torch.diag(torch.diag(H.double()))
    out = torch.zeros(W.shape, dtype=torch.float64)
    for r in range(W.shape[0]):
        S = keep[r].nonzero().flatten()
        rhs = (Hd @ W[r].double())[S]  # (kept,)
        out[r, S] = torch.linalg.solve(Hd[S][:, S], rhs)
    return out


@pytest.mark.parametrize("scheme", [UNSTR, NM24])
@pytest.mark.parametrize("seed", [0, 1])
def test_fixed_mask_admm_converges_to_the_least_squares_optimum(scheme, seed):
    X, W = _correlated(512, 32, seed=seed), _weight(12, 32, seed)
    h, c = _stats(X)
    cfg = admm.ADMMConfig(iters=3000, gradual=0, rho=1.0, damp=0.1)
    got = admm.prune(W, h, scheme, 0.5, "row", cfg)
    keep = mask_for(wanda.prune(W, c, scheme, 0.5, "row", None) != 0, scheme, 0.5, "row")  # Wanda's mask
    assert torch.equal(got != 0, keep)
    ref = _least_squares(W, h.H, keep, 0.1)
    err = lambda V: (X.double() @ (W.double() - V.double()).T).norm().item()  # noqa: E731
    assert err(got) <= err(ref) * (1 + 1e-3)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-3 * W.abs().max().item())


@pytest.mark.parametrize("scheme,per", [(UNSTR, "row"), (UNSTR, "layer"), (NM24, "row"),
                                        (Scheme.parse("block:2x4"), "row")])
def test_gradual_masks_end_on_the_exact_pattern(scheme, per):
    X, W = _correlated(256, 32, seed=2), _weight(10, 32, 2)
    h, _ = _stats(X)
    out = admm.prune(W, h, scheme, 0.5, per, admm.ADMMConfig(iters=6, gradual=4))
    keep = out != 0
    if scheme.kind == "nm":
        assert (keep.view(10, -1, 4).sum(-1) == 2).all()
    elif scheme.kind == "block":  # whole 2 x 4 tiles, half of the 40 dropped
        tiles = keep.view(5, 2, 8, 4).sum((1, 3))  # (5, 8) kept per tile
        assert ((tiles == 0) | (tiles == 8)).all() and int((tiles == 0).sum()) == 20
    elif per == "row":
        assert (keep.sum(1) == 16).all()
    else:
        assert int(keep.sum()) == 160
    assert not torch.signbit(out[out == 0]).any()


def test_schedule_mask_drops_a_growing_share_of_the_final_pattern():
    score = torch.rand(6, 16, generator=torch.Generator().manual_seed(0))
    final = _expected_keep(score, NM24, 0.5, "row")
    counts = [int((~admm._schedule_mask(score, NM24, 0.5, "row", s)).sum()) for s in (0.0, 0.25, 0.5, 1.0)]
    assert counts == [0, 12, 24, 48]
    assert torch.equal(admm._schedule_mask(score, NM24, 0.5, "row", 1.0), final)
    half = admm._schedule_mask(score, NM24, 0.5, "row", 0.5)
    assert not (~half & final).any()  # it drops only what the final pattern drops
    assert score[~half].max() < score[~final & half].min()  # and the lowest of those first


@pytest.mark.parametrize("scheme", [UNSTR, NM24])
@pytest.mark.parametrize("seed", [3, 8, 11])
def test_beats_sparsegpt_on_correlated_inputs(scheme, seed):
    X, W = _correlated(1024, 64, seed=seed), _weight(48, 64, seed)
    h, _ = _stats(X)
    err = lambda V: (X @ (W - V).T).norm().item()  # noqa: E731
    e_admm = err(admm.prune(W, h, scheme, 0.5, "row", admm.ADMMConfig()))
    e_sgpt = err(sparsegpt.prune(W, h, scheme, 0.5, "row", sparsegpt.SparseGPTConfig()))
    assert e_admm < e_sgpt, (e_admm, e_sgpt)


def test_joint_int4_on_the_grid_and_better_than_round_after():
    from sparsify.quant import rtn
    from sparsify.quant.spec import QuantSpec

    X, W = _correlated(1024, 64, seed=5), _weight(32, 64, 5)
    h, _ = _stats(X)
    cfg, spec = admm.ADMMConfig(), QuantSpec.parse("int4", 0)
    quantizer = rtn.column_quantizer(admm.prune(W, h, NM24, 0.5, "row", cfg), spec)
    joint = admm.prune(W, h, NM24, 0.5, "row", cfg, quantize=quantizer)
    assert torch.equal(joint, rtn.snap(joint, quantizer.params))
    assert ((joint != 0).view(32, -1, 4).sum(-1) <= 2).all()
    after, _ = rtn.fake_quantize(admm.prune(W, h, NM24, 0.5, "row", cfg), spec)
    err = lambda V: (X @ (W - V).T).norm().item()  # noqa: E731
    assert err(joint) < err(after)


def test_dead_inputs_zeroed_inputs_untouched_and_one_inverse_shared():
    X, W = _correlated(256, 32, seed=4), _weight(8, 32, 4)
    X[:, 5] = 0
    h = Hessian(32)
    h.add_batch(X)
    W0, H0 = W.clone(), h.H.clone()
    out = admm.prune(W, h, NM24, 0.5, "row", admm.ADMMConfig(iters=5, gradual=3))
    assert (out[:, 5] == 0).all() and torch.equal(W, W0) and torch.equal(h.H, H0)
    first = h.normalized_inverse(0.1, 1.0)
    admm.prune(W * 2, h, NM24, 0.5, "row", admm.ADMMConfig(iters=5, gradual=3))
    assert h.normalized_inverse(0.1, 1.0)[2] is first[2]


def test_ria_score_equals_its_formula_and_bad_scores_are_refused():
    from sparsify.errors import UserError

    g = torch.Generator().manual_seed(7)
    Y, n = torch.randn(5, 6, generator=g), torch.rand(6, generator=g) + 0.1
    got = admm._mask_score(Y * n, n, n, admm.ADMMConfig(score="ria", alpha=0.5))
    for i in range(5):
        for j in range(6):
            a = abs(Y[i, j].item())
            row, col = sum(abs(v) for v in Y[i].tolist()), sum(abs(v) for v in Y[:, j].tolist())
            assert got[i, j].item() == pytest.approx((a / row + a / col) * n[j].item() ** 0.5, rel=1e-5)
    torch.testing.assert_close(admm._mask_score(Y * n, n, n, admm.ADMMConfig()), Y.abs() * n)
    with pytest.raises(UserError, match="score='riaa'"):
        admm.ADMMConfig(score="riaa")
