"""A whole artifact runs through the Triton kernels (interpreter) and matches the reference path.

Two checks, because W8A8 rounds activations and the two paths may round differently at a tie:
- per layer, on the very input the kernel saw: the kernel computes the reference's op up to float
  summation error (tight; here a kernel bug shows);
- the whole model: logits agree up to float error plus, for W8A8, twice the measured effect of
  activation rounding on the logits (derivation at `_activation_rounding_effect`).
"""
from __future__ import annotations

import os

import pytest
import torch
from tiny_models import make_tiny

import sparsify
from sparsify.config import CalibConfig, PruneConfig
from sparsify.kernels import reference
from sparsify.runtime.sparse_linear import SparseLinear

EPS = torch.finfo(torch.float32).eps


def _forward(model, ids, kernels: str, monkeypatch) -> torch.Tensor:
    monkeypatch.setenv("SPARSIFY_KERNELS", kernels)
    with torch.inference_mode():
        return model(input_ids=ids).logits  # (1, T, vocab)


def _activation_rounding_effect(model, ids, want, monkeypatch) -> torch.Tensor:
    """max |logits - logits with W8A8's activation rounding switched off|: 0 without W8A8.

    W8A8 rounds every activation x of a token to a code q = round(x / s), s = max|x| / 127 per token.
    Both paths compute the same codes from the same x (correctly rounded division, round half to
    even), but the x they see differ by float rounding: the reference sums dequantized products in
    float32, the kernel sums int8 products exactly in int32 and scales after. An x within that
    rounding of a half-integer code boundary then rounds the other way in one path: its code moves
    by one step, the layer's output by s * W[:, i] (one activation step times a weight column), and
    later layers see a changed input, so such flips can cascade (measured on this model: about 1
    run in 50 flips, once 228 codes in a cascade, max logit difference 1.8e-3). However many flip,
    each path's logits are the unrounded model's logits moved by rounding every activation by at
    most half a step; the reference's move is measured here as D, the kernel's is the same kind of
    rounding, so |got - want| <= |got - unrounded| + |unrounded - want| is about 2 D (D ~ 4e-3 here).
    """
    with monkeypatch.context() as mp:
        mp.setattr(reference, "quantize_activations_ref", lambda x, act_scale=None: x)
        unrounded = _forward(model, ids, "reference", mp)
    return (want - unrounded).abs().max()


def _check_each_layer(model, ids, monkeypatch) -> int:
    """Every SparseLinear's kernel output vs the reference op on the same input. Same input, same
    activation codes (see above), so only float32 arithmetic differs: each path is within
    (K + 2) eps sum_i |x_i w_ji| of the exact value (K products rounded and summed, two scalings)."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
             for m in model.modules() if isinstance(m, SparseLinear)]
    try:
        _forward(model, ids, "triton", monkeypatch)
    finally:
        for h in hooks:
            h.remove()
    with torch.inference_mode():
        for m, x, got in seen:
            x = x.reshape(-1, m.in_features)
            want = reference.linear(x, m.fmt, m.packed(), m.attrs, m.bias)  # (T, out)
            xq = reference.quantize_activations_ref(x) if m.attrs.get("activations") == "int8" else x
            bound = 2 * (m.in_features + 2) * EPS * (xq.abs() @ m.dense_weight().abs().T)  # (T, out)
            assert ((got.reshape(want.shape) - want).abs() <= bound).all(), m
    return len(seen)


@pytest.mark.parametrize("quant", ["none", "int4", "w8a8"])
def test_llama_artifact_triton_vs_reference(tmp_path, monkeypatch, quant):
    src = make_tiny("llama", tmp_path / "llama")
    cfg = PruneConfig(method="wanda", scheme="2:4", quant=quant, group_size=32 if quant == "int4" else None,
                      calib=CalibConfig(samples=2, seq_len=16, batch_size=2))
    sparsify.prune(str(src), cfg, tmp_path / "out")
    loaded, manifest = sparsify.load(tmp_path / "out")
    seed = int(os.environ.get("SPARSIFY_TEST_SEED", "0"))  # to rerun with other inputs
    ids = torch.randint(5, 500, (1, 5), generator=torch.Generator().manual_seed(seed))
    want = _forward(loaded.model, ids, "reference", monkeypatch)
    got = _forward(loaded.model, ids, "triton", monkeypatch)
    rounding = _activation_rounding_effect(loaded.model, ids, want, monkeypatch)
    assert (rounding > 0) == (quant == "w8a8")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 + 2 * float(rounding))
    assert _check_each_layer(loaded.model, ids, monkeypatch) == 14
    assert manifest["totals"]["targets"] == 14
