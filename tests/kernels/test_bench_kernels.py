"""bench/kernel_speed.py stays runnable: its CPU smoke mode under the interpreter, output to tmp_path."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def test_cpu_smoke(tmp_path):
    path = Path(__file__).resolve().parents[2] / "bench" / "kernel_speed.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "k.json"
    result = mod.main(["--cpu-smoke", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert len(result["rows"]) == len(mod.SMOKE["tokens"]) * len(mod.VARIANTS)
    for row in result["rows"]:
        assert row["ours_ms"] > 0 and row["dense_ms"] > 0 and row["bytes_limit"] > 1
