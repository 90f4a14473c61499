"""Plans (rules -> per-layer plans), byte estimates, and the OWL allocation against direct formulas."""
from __future__ import annotations

import json

import pytest
import torch

from sparsify.allocators.owl import outlier_ratio, spread
from sparsify.config import PruneConfig
from sparsify.errors import UserError
from sparsify.plan import LayerPlan, load_rules, resolve, save_rules

NAMES = [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")]


def test_last_matching_rule_wins_key_by_key():
    rules = [{"match": "*", "method": "wanda", "scheme": "2:4"},
             {"match": "*mlp*", "scheme": "unstructured", "sparsity": 0.6},
             {"match": "*down_proj", "method": "sparsegpt"},
             {"match": "model.layers.0.*", "skip": True}]
    plans = resolve(NAMES, PruneConfig(method="magnitude", sparsity=0.3, quant="int8"), rules)
    q, up, down = (plans[f"model.layers.1.{m}"] for m in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"))
    assert (q.method, q.scheme, q.quant) == ("wanda", "2:4", "int8")  # quant from the flags (first rule)
    assert (up.method, up.scheme, up.sparsity) == ("wanda", "unstructured", 0.6)
    assert (down.method, down.scheme, down.sparsity) == ("sparsegpt", "unstructured", 0.6)
    assert all(plans[n].skip for n in NAMES if n.startswith("model.layers.0."))
    assert not any(plans[n].skip for n in NAMES if not n.startswith("model.layers.0."))
    assert q.effective_sparsity == 0.5 and plans["model.layers.0.mlp.up_proj"].effective_sparsity == 0.0


@pytest.mark.parametrize("rule, message", [
    ({"match": "*nothing*", "sparsity": 0.5}, "matches no target"),
    ({"match": "*", "sparsty": 0.5}, "unknown key"),
    ({"sparsity": 0.5}, "needs a 'match'"),
    ({"match": "*", "scheme": "3:2"}, "N:M needs"),
    ({"match": "*", "sparsity": 1.5}, "outside"),
])
def test_bad_rules_are_one_line_errors(rule, message):
    with pytest.raises(UserError, match=message):
        resolve(NAMES, PruneConfig(), [rule])


def test_rules_files_yaml_json_and_manifest_round_trip(tmp_path):
    (tmp_path / "p.yaml").write_text('rules:\n  - {match: "*mlp*", scheme: "4:8"}\n')
    (tmp_path / "p.json").write_text(json.dumps([{"match": "*q_proj", "sparsity": 0.7}]))
    assert load_rules(tmp_path / "p.yaml") == [{"match": "*mlp*", "scheme": "4:8"}]
    assert load_rules(tmp_path / "p.json") == [{"match": "*q_proj", "sparsity": 0.7}]
    (tmp_path / "bad.yaml").write_text("rules: [ {match: ")
    with pytest.raises(UserError, match="not valid YAML"):
        load_rules(tmp_path / "bad.yaml")
    plans = resolve(NAMES, PruneConfig(), load_rules(tmp_path / "p.yaml"))
    plans = {n: p.with_sparsity(0.1 * (i + 1)) if p.scheme == "unstructured" else p for i, (n, p) in enumerate(plans.items())}
    save_rules(plans, tmp_path / "saved.yaml")
    assert resolve(NAMES, PruneConfig(method="magnitude"), load_rules(tmp_path / "saved.yaml")) == plans
    manifest = {"tensors": {}, "plan": {"layers": {n: {**p.to_json(), "format": "x"} for n, p in plans.items()}}}
    manifest["plan"]["layers"] = {n: {k: v for k, v in d.items() if k != "format"} for n, d in manifest["plan"]["layers"].items()}
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "sparsify.json").write_text(json.dumps(manifest))
    assert resolve(NAMES, PruneConfig(quant="int8"), load_rules(tmp_path / "art")) == plans


@pytest.mark.parametrize("scheme, sparsity, quant, group", [
    ("unstructured", 0.6, "none", None), ("2:4", 0.5, "none", None), ("4:8", 0.5, "int8", None),
    ("unstructured", 0.3, "int4", 32), ("2:4", 0.5, "int4", 128), ("unstructured", 0.5, "fp8", None),
])
def test_estimated_bytes_match_packing_the_real_layer(scheme, sparsity, quant, group):
    from sparsify.formats import format_for, pack
    from sparsify.formats.base import nbytes
    from sparsify.planning import estimate_bytes
    from sparsify.pruners.masks import apply_mask, mask_for
    from sparsify.quant import rtn
    from sparsify.quant.spec import QuantSpec

    p = LayerPlan("x", "magnitude", scheme, sparsity, quant=quant, group_size=group)
    w = torch.randn(200, 256, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    w = apply_mask(w, mask_for(w.float().abs(), p.parsed_scheme, sparsity, "row"))
    fmt, opts = format_for(p.parsed_scheme)
    spec = QuantSpec.parse(quant, group)
    if spec is not None:
        w, params = rtn.fake_quantize(w, spec)
        opts = {**opts, "quant": params}
    real = nbytes(pack(fmt, w, **opts)[0])
    est = estimate_bytes((200, 256), torch.float16, p)
    assert abs(est - real) <= 0.01 * real  # per-row formats: exact up to row_ptr's constant and int4 nibble padding


def test_owl_spread_formula_and_budget():
    ratios = {"a": 0.01, "b": 0.03, "c": 0.02, "d": 0.01}
    numel = {"a": 100, "b": 100, "c": 300, "d": 100}
    got = spread(ratios, numel, 0.7, 0.08)
    # direct formula: s = S - lam * (2 (D - min) / (max - min) - 1), then one shift to the weighted mean
    raw = {k: 0.7 - 0.08 * (2 * (v - 0.01) / 0.02 - 1) for k, v in ratios.items()}
    shift = 0.7 - sum(raw[k] * numel[k] for k in raw) / sum(numel.values())
    for k in raw:
        assert got[k] == pytest.approx(raw[k] + shift, abs=1e-12)
    assert sum(got[k] * numel[k] for k in got) / 600 == pytest.approx(0.7, abs=1e-12)
    assert got["b"] < got["c"] < got["a"] == got["d"]  # more outliers -> pruned less


def test_owl_spread_clips_and_keeps_the_budget():
    got = spread({"a": 0.0, "b": 1.0, "c": 0.5}, {"a": 10, "b": 1000, "c": 10}, 0.95, 0.2, max_sparsity=0.99)
    assert all(0 <= v <= 0.99 for v in got.values())
    assert (got["a"] * 10 + got["b"] * 1000 + got["c"] * 10) / 1020 == pytest.approx(0.95, abs=1e-9)
    assert spread({"a": 0.2, "b": 0.2}, {"a": 1, "b": 3}, 0.5, 0.08) == {"a": 0.5, "b": 0.5}


def test_outlier_ratio_against_a_loop():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(7, 9, generator=g) ** 4, torch.rand(5, 3, generator=g) ** 4]
    flat = [float(v) for s in scores for v in s.reshape(-1)]
    mean = sum(flat) / len(flat)
    assert outlier_ratio(scores, 2.0) == pytest.approx(sum(v > 2.0 * mean for v in flat) / len(flat))
