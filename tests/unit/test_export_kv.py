"""ONNX export of decoders with the KV cache: one decoding step, checked by greedy generation.

Independent checks beside the exporter's own: transformers' ``generate`` on the artifact (not our
greedy loop), and the cache graph run once on the whole sequence against step by step (what the
cache carries between steps must equal recomputing the prefix).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import make_tiny

import sparsify
from sparsify.errors import UserError
from sparsify.exporters import onnx as onnx_export
from sparsify.exporters import onnx_kv
from sparsify.exporters.onnx import export_onnx


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv")
    src = make_tiny("llama", root / "llama")  # grouped-query attention: 2 kv heads of 4
    sparsify.prune(str(src), sparsify.PruneConfig(method="magnitude", scheme="2:4", quant="int8"), root / "art")
    return root / "art"


@pytest.fixture(scope="module")
def exported(artifact, tmp_path_factory):
    path = tmp_path_factory.mktemp("kv-onnx") / "model.onnx"
    return path, export_onnx(artifact, path)


def test_graph_has_past_and_present_in_the_optimum_layout(exported):
    path, r = exported
    assert r["kv_cache"] and r["verified"] and r["greedy_match"] and r["greedy_tokens"] == 16
    pasts = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert r["inputs"] == ["input_ids", "attention_mask", "position_ids", *pasts]
    assert r["outputs"] == ["logits", *[p.replace("past_key_values", "present") for p in pasts]]
    from sparsify.eval.onnx_model import ort_session

    shapes = {i.name: i.shape for i in ort_session(path).get_inputs()}
    assert shapes["past_key_values.1.value"] == ["batch", 2, "past", 16]  # (batch, kv heads, past, head dim)


def test_greedy_generation_matches_transformers_generate(artifact, exported):
    """ORT's own cache loop against transformers' generate() on the packed artifact."""
    path, r = exported
    from sparsify.eval.onnx_model import ort_session

    model, _ = sparsify.load(artifact)
    prompt = torch.tensor([[2, 17, 99, 305, 41, 7, 250]])  # (1, 7)
    with torch.no_grad():
        want = model.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                    min_new_tokens=16, do_sample=False)[0, 7:].tolist()
    shape = onnx_kv.CacheShape([(2, 16, 16)] * 2, "cache", True)
    got, _ = onnx_kv.greedy(onnx_kv.ort_step(ort_session(path), shape), prompt, shape.empty(1))
    assert got == want


def test_cache_carries_what_recomputing_the_prefix_gives(exported):
    path, _ = exported
    from sparsify.eval.onnx_model import OnnxModel, ort_session

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 512, (2, 9), generator=g)  # (B, T)
    whole = OnnxModel(path)(input_ids=ids).logits  # one call, empty pasts by default
    shape = onnx_kv.CacheShape([(2, 16, 16)] * 2, "cache", True)
    step, past, steps = onnx_kv.ort_step(ort_session(path), shape), shape.empty(2), []
    for t0, t1 in [(0, 4), (4, 5), (5, 9)]:  # a 4-token prompt, one token, then three at once
        mask = torch.ones(2, t1, dtype=torch.long)
        logits, *past = step(ids[:, t0:t1], mask, torch.arange(t0, t1).expand(2, -1), past)
        steps.append(logits)
    assert past[0].shape == (2, 2, 9, 16)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-4, atol=1e-4 * whole.abs().max().item())


def test_a_generation_mismatch_fails_and_writes_nothing(artifact, tmp_path, monkeypatch):
    real = onnx_export._greedy_reference

    def other(*a):  # PyTorch "prefers" another token at step 3 by a wide margin
        tokens, logits, prompt = real(*a)
        logits = [x.clone() for x in logits]
        tokens = list(tokens)
        tokens[3] = (tokens[3] + 1) % logits[3].numel()
        logits[3][tokens[3]] = logits[3].max() + 10
        return tokens, logits, prompt

    monkeypatch.setattr(onnx_export, "_greedy_reference", other)
    with pytest.raises(UserError, match="greedy generation .* differs from PyTorch at token 4 of 16"):
        export_onnx(artifact, tmp_path / "o" / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_compare_greedy_tells_ties_from_errors():
    logits = [torch.tensor([0.0, 5.0, 5.0 - 1e-5]), torch.tensor([0.0, 1.0, 9.0])]
    assert onnx_kv.compare_greedy(([1, 2], logits), [1, 2], 1e-4)["greedy_match"]
    tie = onnx_kv.compare_greedy(([1, 2], logits), [2, 1], 1e-4)
    assert not tie["greedy_match"] and tie["greedy_tie"] and tie["greedy_first_difference"] == 0
    wrong = onnx_kv.compare_greedy(([1, 2], logits), [1, 1], 1e-4)
    assert not wrong["greedy_tie"] and wrong["greedy_margin"] == pytest.approx(8.0)


def test_without_cache_and_when_the_cache_is_not_keys_and_values(artifact, tmp_path, monkeypatch):
    r = export_onnx(artifact, tmp_path / "plain.onnx", kv_cache=False)
    assert not r["kv_cache"] and r["inputs"] == ["input_ids", "attention_mask"] and r["outputs"] == ["logits"]
    assert "greedy_match" not in r and "kv_cache_note" not in r
    monkeypatch.setattr(onnx_kv, "probe_cache", lambda model, sample: (None, "its cache is a state"))
    r = export_onnx(artifact, tmp_path / "state.onnx")
    assert not r["kv_cache"] and r["kv_cache_note"] == "no cache graph: its cache is a state"
    feeds = {"input_ids": np.array([[5, 6, 7]]), "attention_mask": np.ones((1, 3), np.int64)}
    from sparsify.eval.onnx_model import ort_session

    assert ort_session(tmp_path / "state.onnx").run(None, feeds)[0].shape == (1, 3, 512)
