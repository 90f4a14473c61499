"""Per-layer plans and allocation end to end: `sparsify plan`, `prune --plan / --allocation`, checked
from the artifact's weights (never from its manifest alone)."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import SMALL_CALIB, check_plan_applied, cli, cli_json, dense_weights
from tiny_models import make_tiny

RULES = """rules:
  - {match: "*", method: wanda, scheme: "2:4"}
  - {match: "*mlp*", scheme: unstructured, sparsity: 0.6}
  - {match: "model.layers.0.*", skip: true}
"""


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


def test_plan_command_then_prune_with_the_plan(llama, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(RULES)
    shown = cli_json("plan", llama, "--plan", plan)
    rows = {r["module"]: r for r in shown["layers"]}
    assert rows["model.layers.0.mlp.up_proj"]["skip_reason"] == "plan: skip"
    assert rows["model.layers.1.mlp.up_proj"]["format"] == "bitmask" and rows["model.layers.1.mlp.up_proj"]["sparsity"] == 0.6
    assert rows["model.layers.1.self_attn.q_proj"]["format"] == "nm"
    assert "skip" in cli("plan", llama, "--plan", plan).stdout
    out = tmp_path / "out"
    m = cli_json("prune", llama, "--plan", plan, "-o", out, *SMALL_CALIB)
    check_plan_applied(out, llama, ("model.layers.0.",), 0.6)
    est = {r["module"]: r["est_bytes"] for r in shown["layers"] if not r["skip_reason"]}
    for e in m["tensors"].values():
        assert abs(est[e["module"]] - e["bytes"]) <= 0.02 * e["bytes"]  # the plan's estimate vs the real packing
    assert "plan: skip" in cli("info", out).stdout
    info = cli_json("info", out)
    assert {e["format"] for e in info["tensors"].values()} == {"nm", "bitmask"}
    report = cli_json("eval", out, "--seq-len", "32", "--windows", "2", "--report", tmp_path / "rep")
    layers = json.loads((tmp_path / "rep" / "eval.json").read_text())["bytes"]["layers"]
    assert {v["format"] for v in layers.values()} == {"nm 2:4", "bitmask"} and report["report_files"]

    # the manifest is a plan: the same run again gives the same weights
    again = tmp_path / "again"
    cli("prune", llama, "--plan", out, "-o", again, *SMALL_CALIB)
    a, b = dense_weights(out), dense_weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_owl_allocation_saved_and_reused(llama, tmp_path):
    saved = tmp_path / "alloc.json"
    out = tmp_path / "owl"
    m = cli_json("prune", llama, "--sparsity", "0.7", "--allocation", "owl", "--save-allocation", saved,
                 "-o", out, *SMALL_CALIB)
    groups = m["allocation"]["groups"]
    assert set(groups) == {"model.layers.0", "model.layers.1"}
    s = {b: g["sparsity"] for b, g in groups.items()}
    score = {b: g["score"] for b, g in groups.items()}
    hi, lo = max(score, key=score.get), min(score, key=score.get)
    assert s[hi] < s[lo] and s[lo] - s[hi] == pytest.approx(0.16)  # 2 * lambda between the extremes
    assert (s[hi] + s[lo]) / 2 == pytest.approx(0.7)  # equal block sizes: the plain mean is the target
    for name, w in dense_weights(out).items():  # each row of each layer at its block's sparsity, from the weights
        block = name.rsplit(".", 2)[0]
        assert torch.all((w == 0).sum(1) == int(w.shape[1] * s[block])), name
    rules = json.loads(saved.read_text())["rules"]
    assert {r["match"] for r in rules} == set(m["plan"]["layers"])
    again = tmp_path / "again"
    cli("prune", llama, "--plan", saved, "-o", again, *SMALL_CALIB)
    a, b = dense_weights(out), dense_weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
