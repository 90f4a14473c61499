"""bench/quality.py end to end on a tiny Llama: the distill suite's rows, wall times and mask check."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_models import make_tiny

ROOT = Path(__file__).resolve().parents[2]


def test_quality_distill_suite_on_tiny_llama(tmp_path):
    model, out = make_tiny("llama", tmp_path / "llama"), tmp_path / "q.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--model", str(model), "--suite",
                           "distill", "--distill-steps", "2", "--samples", "4", "--seq-len", "32", "--windows", "2",
                           "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == ["dense", "sparsegpt 2:4 distill 0", "sparsegpt 2:4 distill 2"]
    assert rows[2]["distill"]["steps"] == 2 and rows[2]["distill"]["wall_s"] > 0
    assert rows[1]["mask_vs_distill_0_differing"] == 0 == rows[2]["mask_vs_distill_0_differing"]
    assert rows[2]["mask_positions"] > 0 and "mask positions differing" in proc.stdout


def test_allocation_bench_on_tiny_llama(tmp_path):
    model, out = make_tiny("llama", tmp_path / "llama"), tmp_path / "a.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "allocation.py"), "--model", str(model),
                           "--sparsities", "0.7", "--samples", "4", "--seq-len", "32", "--windows", "2",
                           "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["sparsity_target"], r["allocation"]) for r in rows] == [(0.7, "uniform"), (0.7, "owl")]
    assert rows[0]["ratio_vs_uniform"] == 1.0 and rows[1]["perplexity"] > 0
    owl = rows[1]["block_sparsity"]
    assert set(owl) == {"model.layers.0", "model.layers.1"} and max(owl.values()) - min(owl.values()) > 0.1


def test_ecoflap_draws_bench_replays_the_stop_rule_on_tiny_llama(tmp_path):
    model, out, values = make_tiny("llama", tmp_path / "llama"), tmp_path / "d.json", tmp_path / "v.json"
    args = ["--model", str(model), "--samples", "8", "--seq-len", "32", "--windows", "2", "--sparsities", "0.6",
            "--max-draws", "12", "--draws", "4:8", "--rtols", "1.0", "--values", str(values), "--out", str(out)]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ecoflap_draws.py"), *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    drawn = result["drawn"]
    assert len(drawn["pilot"]) == 8 and drawn["pilot_group"] == "model.layers.0"
    assert all(len(v) == 12 for v in drawn["values"].values())
    rows = {r["rule"]: r for r in result["rows"]}
    assert set(rows) == {"uniform", "draws=4:8", "rtol=1.0"}
    assert rows["draws=4:8"]["draws_per_group"] == 4
    assert rows["rtol=1.0"]["draws"] == 8 + 2 * 8  # the pilot, then min_samples per group
    assert json.loads(values.read_text()) == drawn  # written for reuse, pilot included
