"""`sparsify prune --allocation ecoflap` end to end on a tiny Llama: the manifest's allocation, the budget
counted from the artifact's weights, the saved plan reused, the flags and their errors, and the bench script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SMALL_CALIB, cli, cli_json, dense_weights
from tiny_models import make_tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


def test_ecoflap_first_order_blocks_saved_and_reused(llama, tmp_path):
    saved, out = tmp_path / "alloc.yaml", tmp_path / "eco"
    m = cli_json("prune", llama, "--sparsity", "0.7", "--allocation", "ecoflap", "--save-allocation", saved,
                 "-o", out, *SMALL_CALIB)
    a = m["allocation"]
    assert a["name"] == "ecoflap" and a["options"]["score"] == "first" and a["group"] == "block"
    assert a["max_sparsity"] == pytest.approx(0.8) and a["loss"] == "NextToken" and a["score_s"] >= 0
    groups = a["groups"]
    assert set(groups) == {"model.layers.0", "model.layers.1"}
    numel = sum(g["numel"] for g in groups.values())
    assert sum(g["keep"] for g in groups.values()) == round(0.3 * numel)  # the budget, exactly
    hi, lo = sorted(groups, key=lambda b: groups[b]["score"], reverse=True)
    assert groups[hi]["keep"] > groups[lo]["keep"] and groups[lo]["sparsity"] <= 0.8 + 1e-9
    weights = dense_weights(out)
    for name, w in weights.items():  # each row at its block's sparsity, counted from the packed weights
        s = groups[name.rsplit(".", 2)[0]]["sparsity"]
        assert torch.all((w == 0).sum(1) == int(w.shape[1] * round(s, 6))), name
    kept = sum(int((w != 0).sum()) for w in weights.values())
    assert abs(kept - round(0.3 * numel)) <= len(weights) * 64  # per-row rounding only (64-wide rows at most)
    info = cli("info", out).stdout
    assert "ecoflap allocation, target 70.0%, cap 80.0%" in info
    share = groups[hi]["score"] / sum(g["score"] for g in groups.values())
    row = next(line for line in info.splitlines() if line.strip().startswith(hi))  # group, sparsity, score, share
    assert f"{groups[hi]['sparsity']:.1%}" in row and f"{share:.1%}" in row
    r = cli_json("eval", out, "--no-baseline", "--windows", "1", "--seq-len", "16", "--report", tmp_path / "rep")
    assert r["allocation"]["groups"][hi]["share"] == pytest.approx(share)
    assert (tmp_path / "rep" / "allocation.png").stat().st_size > 1000
    again = tmp_path / "again"
    cli("prune", llama, "--plan", saved, "-o", again, *SMALL_CALIB)
    b = dense_weights(again)
    assert all(torch.equal(weights[k], b[k]) for k in weights)


def test_ecoflap_zeroth_order_per_matrix_with_the_flags(llama, tmp_path):
    scores = tmp_path / "scores.json"
    args = ["--sparsity", "0.6", "--allocation", "ecoflap", "--score", "zeroth", "--group", "matrix",
            "--max-sparsity", "0.75", "--score-samples", "6", "--allocation-arg", f"scores_file={scores}",
            "--allocation-arg", "seed=1"]
    m = cli_json("prune", llama, *args, "-o", tmp_path / "a", *SMALL_CALIB)
    a = m["allocation"]
    assert a["options"]["max_sparsity"] == 0.75 and a["options"]["score_samples"] == 6 and a["options"]["seed"] == 1
    groups = a["groups"]
    assert len(groups) == 14 and all(g["matrices"] == 1 and g["samples"] == 6 for g in groups.values())
    assert a["pilot_draws"] == 0 and a["pooled_cv"] > 0  # 6 units, fewer than (0.756 / 0.2)^2 = 15: no pilot, every draw
    assert all(g["sparsity"] <= 0.75 + 1e-9 for g in groups.values())
    assert sum(g["keep"] for g in groups.values()) == round(0.4 * sum(g["numel"] for g in groups.values()))
    assert json.loads(scores.read_text())["scores"] == {k: g["score"] for k, g in groups.items()}
    reused = cli_json("prune", llama, *args, "--sparsity", "0.7", "-o", tmp_path / "b", *SMALL_CALIB)["allocation"]
    assert reused["scores_from"] == str(scores) and reused["score_s"] < 1
    assert {k: g["score"] for k, g in reused["groups"].items()} == {k: g["score"] for k, g in groups.items()}


def test_ecoflap_errors_are_one_line(llama, tmp_path):
    r = cli("prune", llama, "--group", "block", "-o", tmp_path / "x", *SMALL_CALIB, code=2)
    assert "--group only apply to --allocation ecoflap" in r.stderr
    r = cli("prune", llama, "--allocation", "ecoflap", "--group", "layer", "-o", tmp_path / "y", *SMALL_CALIB, code=2)
    assert "group='layer'" in r.stderr and "Traceback" not in r.stderr
    r = cli("prune", llama, "--allocation", "ecoflap", "--sparsity", "0.6", "--max-sparsity", "0.5",
            "-o", tmp_path / "z", *SMALL_CALIB, code=2)
    assert "below the target sparsity" in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_ecoflap_bench_on_tiny_llama(llama, tmp_path):
    out = tmp_path / "e.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ecoflap.py"), "--model", str(llama),
                           "--sparsities", "0.7", "--variants",
                           "wanda:uniform,wanda:ecoflap,magnitude:ecoflap/max-sparsity=+0.2@0.7", "--samples", "4", "--seq-len", "32", "--windows", "2",
                           "--zo-blocks", "0,1", "--zo-samples", "16", "--zo-rtol", "2.0", "--out", str(out)],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["sparsity_target"], r["method"], r["allocation"]) for r in rows] == [
        (0.7, "wanda", "uniform"), (0.7, "wanda", "ecoflap"), (0.7, "magnitude", "ecoflap")]
    eco = [r for r in rows if r["allocation"] == "ecoflap"]
    assert [r["scores_reused"] for r in eco] == [False, True] and all(r["perplexity"] > 0 for r in rows)
    assert eco[0]["ratio_vs_uniform"] > 0 and "ratio_vs_owl" not in eco[0]
    assert "ratio_vs_uniform" not in eco[1] and eco[1]["max_sparsity"] == pytest.approx(0.9)  # no magnitude:uniform
    assert eco[1]["prune_with_scoring_s"] == pytest.approx(eco[1]["prune_s"] + eco[0]["score_s"])
    assert all(r["time_vs_uniform_wanda"] > 0 for r in rows)
    z = result["zeroth_order_timing"]
    assert z["samples_per_group"] == 16 and z["max_rel_diff"] < 1e-3 and z["batched_s"] > 0 and z["naive_s"] > 0
    stop = z["early_stop"]  # (cv / 2)^2 < min_samples = 8: a pilot of 8, then the fewest draws allowed
    assert stop["rtol"] == 2.0 and stop["pilot_draws"] == 8 and stop["pooled_cv"] > 0
    assert all(n == 8 for n in stop["samples"].values())
    assert "zeroth order, 2 block groups" in proc.stdout
