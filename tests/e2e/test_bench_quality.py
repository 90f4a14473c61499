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
