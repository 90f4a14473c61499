"""Per-layer pruning notes: SparseGPT's damping and fallback in the manifest, the calibration actually used."""
from __future__ import annotations

import torch
from tiny_models import make_tiny

import sparsify
from sparsify.calibrate.stats import Hessian
from sparsify.config import CalibConfig, PruneConfig
from sparsify.pruning import solver_note


def test_solver_note_reports_raised_damping_and_fallback():
    ok = Hessian(8)
    ok.add_batch(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)))
    ok.factor(0.01)
    assert solver_note("a", ok, 0.01) == ({"damp": 0.01, "fallback": False}, None)
    bad = Hessian(8)
    bad.H = -torch.eye(8)  # negative definite: no damping makes it factor
    bad.tokens = 1
    bad.factor(0.01)
    info, warning = solver_note("layer.x", bad, 0.01)
    assert info == {"damp": None, "fallback": True} and "layer.x" in warning and "no update" in warning
    assert solver_note("w", object(), None) == (None, None)  # statistics without a solve: nothing to say


def test_manifest_records_solver_and_the_window_actually_used(tmp_path):
    src = make_tiny("llama", tmp_path / "llama")  # max_position_embeddings = 128
    cfg = PruneConfig(method="sparsegpt", scheme="2:4", calib=CalibConfig(samples=2, seq_len=512, batch_size=2))
    m = sparsify.prune(str(src), cfg, tmp_path / "out")
    assert set(m["solver"]) == {e["module"] for e in m["tensors"].values()}
    assert all(v == {"damp": 0.01, "fallback": False} for v in m["solver"].values()) and m["warnings"] == []
    assert m["calibration"]["seq_len"] == 128 and m["calibration"]["seq_len_requested"] == 512


def _pruned_weights(src, cfg, out):
    sparsify.prune(str(src), cfg, out)
    from sparsify.runtime.load import load_artifact

    model = load_artifact(out)[0].model
    return {n: m.dense_weight() for n, m in model.named_modules() if hasattr(m, "dense_weight")}


def test_stacked_solve_of_layers_sharing_a_hessian_equals_one_solve_per_layer(tmp_path, monkeypatch):
    """q/k/v and gate/up go through SparseGPT as one stacked matrix each; the rows are independent, so
    the weights equal separate solves up to float summation order, and the masks are the same."""
    from sparsify.pruning import LayerStep

    src = make_tiny("llama", tmp_path / "llama")
    calls = []
    original = LayerStep.__call__
    monkeypatch.setattr(LayerStep, "__call__", lambda self, w, s: calls.append(w.shape[0]) or original(self, w, s))
    for scheme in ("2:4", "unstructured"):
        cfg = PruneConfig(method="sparsegpt", scheme=scheme, calib=CalibConfig(samples=4, seq_len=32, batch_size=2))
        calls.clear()
        stacked = _pruned_weights(src, cfg, tmp_path / f"stacked-{scheme}")
        assert len(calls) == 2 * 4  # per block: q/k/v, o, gate/up, down
        with monkeypatch.context() as m:
            m.setattr(LayerStep, "stack_key", lambda self, stats: None)
            calls.clear()
            single = _pruned_weights(src, cfg, tmp_path / f"single-{scheme}")
            assert len(calls) == 2 * 7
        assert stacked.keys() == single.keys() and len(stacked) == 14
        for name in stacked:
            assert torch.equal(stacked[name] != 0, single[name] != 0), name
            torch.testing.assert_close(stacked[name], single[name], rtol=1e-4, atol=1e-5)
