"""Sparse distillation on a tiny Llama: loss goes down, the mask is provably unchanged, grid kept."""
from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny

from sparsify.config import CalibConfig, PruneConfig
from sparsify.models.load import load_model, resolve
from sparsify.pipeline import prune_model
from sparsify.quant.spec import QuantSpec
from sparsify.registry import get, PRUNERS


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_distill_keeps_mask_and_lowers_loss(tmp_path, quant):
    from sparsify.distill import distill_model

    src = resolve(str(make_tiny("llama", tmp_path / "llama")))
    cfg = PruneConfig(method="magnitude", scheme="2:4", quant=quant, group_size=32 if quant == "int4" else None,
                      distill_steps=6, calib=CalibConfig(samples=4, seq_len=32, batch_size=4))
    loaded = load_model(src)
    pruner = get(PRUNERS, "magnitude", "method")
    spec = QuantSpec.parse(cfg.quant, cfg.group_size)
    flat, qparams, _, _ = prune_model(loaded, cfg, pruner, pruner.config_cls(), spec)
    before = {n: lin.weight.detach().clone() for n, lin in flat.items()}
    info = distill_model(loaded, flat, qparams, cfg, src, lr=3e-4)
    assert info["loss_last"] < info["loss_first"] and info["steps"] == 6
    changed = 0
    for name, lin in flat.items():
        w = lin.weight.detach()
        assert torch.equal(w != 0, before[name] != 0), name  # same positions, same count
        changed += int((w != before[name]).sum())
        if qparams.get(name) is not None:
            from sparsify.quant import rtn

            assert torch.equal(rtn.snap(w, qparams[name]), w)
    assert changed > 0
    assert not any(lin.weight.requires_grad for lin in flat.values())
