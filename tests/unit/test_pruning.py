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
