"""A whole artifact runs through the Triton kernels (interpreter) and matches the reference path."""
from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny

import sparsify
from sparsify.config import CalibConfig, PruneConfig


@pytest.mark.parametrize("quant", ["none", "int4", "w8a8"])
def test_llama_artifact_triton_vs_reference(tmp_path, monkeypatch, quant):
    src = make_tiny("llama", tmp_path / "llama")
    cfg = PruneConfig(method="wanda", scheme="2:4", quant=quant, group_size=32 if quant == "int4" else None,
                      calib=CalibConfig(samples=2, seq_len=16, batch_size=2))
    sparsify.prune(str(src), cfg, tmp_path / "out")
    loaded, manifest = sparsify.load(tmp_path / "out")
    ids = torch.randint(5, 500, (1, 5))
    with torch.inference_mode():
        monkeypatch.setenv("SPARSIFY_KERNELS", "reference")
        want = loaded.model(input_ids=ids).logits
        monkeypatch.setenv("SPARSIFY_KERNELS", "triton")
        got = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert manifest["totals"]["targets"] == 14
