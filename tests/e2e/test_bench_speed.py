"""The CPU speed scripts on tiny inputs: bench/speed.py on a tiny Llama's artifacts (made here, reused by
the script) and bench/cpu_kernels.py --quick. Fields only, no timing thresholds."""
import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_models import make_tiny

ROOT = Path(__file__).resolve().parents[2]


def _run(*args) -> None:
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "SPARSIFY_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_speed_script_on_tiny_llama(tmp_path):
    import sparsify

    model = make_tiny("llama", tmp_path / "llama")
    for name, quant in (("wanda-24", None), ("wanda-24-int8", "int8"), ("wanda-24-int4", "int4")):
        sparsify.prune(str(model), sparsify.PruneConfig(method="magnitude", scheme="2:4", quant=quant), tmp_path / name)
    out = tmp_path / "speed.json"
    _run(ROOT / "bench" / "speed.py", "--model", model, "--artifacts", tmp_path, "--reps", "1", "--decode-tokens", "2",
         "--prompt-len", "8", "--threads", "1", "--out", out)
    r = json.loads(out.read_text())
    assert set(r["targets"]) == {"2:4", "2:4+int8", "2:4+int4"} and r["threads"] == 1
    phases = [(row["phase"], row["batch"]) for row in r["generation"]["rows"]]
    assert phases == [("prefill", 1), ("decode", 1), ("decode", 8)]
    for name in ("dense", "2:4", "2:4+int8", "2:4+int4"):
        assert r["generation"]["memory"][name]["weights_bytes"] > 0
        assert all(row[f"{name}_per_s"] > 0 for row in r["generation"]["rows"])
    assert sum(r["kernels_at_decode"]["2:4+int8"]["1"].values()) == 14


def test_cpu_kernels_script_quick(tmp_path):
    out = tmp_path / "ck.json"
    _run(ROOT / "bench" / "cpu_kernels.py", "--quick", "--threads", "1", "--out", out)
    r = json.loads(out.read_text())
    assert {"cpu-nm24|nm|int8|float32", "cpu-csr|bitmask|float@0.05|float32"} <= set(r["crossover_tokens"])
    assert all(row["ms"]["dense"] > 0 for row in r["rows"])


FAKE_OFFICIAL = '''
import torch


def get_loaders(*a, **k):
    raise AssertionError("the bench replaces get_loaders with sparsify's calibration batches")


def prune_wanda(args, model, tokenizer, device, prune_n=0, prune_m=0):
    """Stands in for the official code: magnitude N:M on every Linear of the decoder layers."""
    assert len(get_loaders()[0]) == args.nsamples
    for layer in model.model.layers:
        for lin in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
            w = lin.weight.data.view(lin.out_features, -1, prune_m)  # (out, in/m, m)
            drop = w.abs().argsort(-1)[..., :prune_m - prune_n]
            w.scatter_(-1, drop, 0.0)
'''


def test_prune_speed_script_with_a_stand_in_official_repo(tmp_path):
    repo = tmp_path / "official"
    (repo / "lib").mkdir(parents=True)
    (repo / "lib" / "prune.py").write_text(FAKE_OFFICIAL)
    model = make_tiny("llama", tmp_path / "llama")
    out = tmp_path / "prune_speed.json"
    _run(ROOT / "bench" / "prune_speed.py", "--repo", repo, "--model", model, "--configs", "wanda:2:4",
         "--samples", "2", "--seq-len", "16", "--windows", "2", "--out", out)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["config"] == "wanda 2:4" and row["target"] == 0.9 and row["met"] == (row["ratio"] <= 0.9)
    assert row["official_s"] >= 0 and row["sparsify_s"] > 0
    assert row["official_perplexity"] > 1 and row["sparsify_perplexity"] > 1
    assert len(row["runs"]["official"]) == len(row["runs"]["sparsify"]) == 1
