"""`torchrun --nproc-per-node 2 -m sparsify prune` (gloo, CPU) writes the artifact one process writes.

One run covers Wanda (2:4 attention), SparseGPT (unstructured MLP, through --plan) and Double Sparsity
(QKStats: sums and key ranges, ranked on rank 0; ``--ds-statistic qk`` saves the time of ``auto``'s
held-out scoring, which rank 0 alone runs from the reduced statistics). The 1-process run is the same
command in this process, on one thread like each rank, while torchrun runs beside it.
"""
from __future__ import annotations

import json

import torch
from distributed_worker import finish, start
from helpers import cli_json
from safetensors.torch import load_file
from tiny_models import make_tiny

from sparsify.exporters.safetensors_io import read_tensors

PLAN = """rules:
  - {match: "*", method: wanda, scheme: "2:4"}
  - {match: "*mlp*", method: sparsegpt, scheme: unstructured, sparsity: 0.5}
"""
# 8 windows of 32 tokens in 4 batches: 2 per rank. Blocks' statistics are fp32 sums of the same 4
# batch terms added in another order, so they differ by a few roundings, 4 u ~ 2.4e-7 of their size
# (u = 2^-24); Wanda only ranks them, so its masks and (unchanged) weights are identical, and so is
# everything computed from the first block's inputs alone (its key ranges: min / max are exact).
# SparseGPT solves with the damped Hessian, whose condition number here is below 1e3 (measured
# 470-800): a 4 u change of H moves its updated weights by at most ~1e3 x 4 u = 2.4e-4 of their size,
# and the next block's inputs (so its statistics) by as much. RTOL: that, of the tensor's largest
# value (measured: 2e-6); the masks still agree exactly.
ARGS = ["--plan", "plan.yaml", "--attention", "double-sparsity", "--ds-statistic", "qk", "--samples", "8",
        "--seq-len", "32", "--batch-size", "2"]
RTOL = 2.5e-4


def two_beside_one(two_args: list, one_args: list, cwd) -> tuple[dict, dict, str]:
    """(the 1-process manifest, the 2-rank one, torchrun's stderr): ``sparsify prune TWO_ARGS`` under
    torchrun while ``ONE_ARGS`` runs in this process on one thread, like each rank."""
    proc = start(["-m", "sparsify", "prune", *two_args, "--json"], cwd)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = cli_json("prune", *one_args)
    finally:
        torch.set_num_threads(threads)
    stdout, stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    return one, json.loads(stdout), stderr  # one JSON document: rank 1 printed nothing


def test_two_gloo_ranks_write_the_one_process_artifact(tmp_path, monkeypatch):
    make_tiny("llama", tmp_path / "llama")
    (tmp_path / "plan.yaml").write_text(PLAN)
    monkeypatch.chdir(tmp_path)
    one, two, _ = two_beside_one(["llama", "-o", "two", *ARGS], ["llama", "-o", "one", *ARGS], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "one", "plan.yaml", "two"]  # rank 1 wrote nothing
    assert two["timing"]["processes"] == 2
    for key in set(one) - {"created", "timing"}:  # plan, tensors (sparsity, bytes), calibration, attention, ...
        assert one[key] == two[key], key
    assert {p["method"] for p in one["plan"]["layers"].values()} == {"wanda", "sparsegpt"}
    assert one["attention"]["statistic"] == "qk" and one["calibration"]["batches"] == 4
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("ds.layers.") for k in a)
    updated = {k for k in a if ".mlp." in k and k.endswith(".values")}  # SparseGPT's updated weights
    later = {k for k in a if k.startswith("ds.layers.") and not k.startswith("ds.layers.0.")
             and a[k].is_floating_point()}  # statistics of blocks after a SparseGPT-updated one
    assert updated
    for key, x in a.items():
        if key in updated | later:
            assert (x - b[key]).abs().max() <= RTOL * x.abs().max(), key
        else:  # masks (meta, bitmask), Wanda, block 0's key ranges, channel rankings, untouched tensors
            assert torch.equal(x, b[key]), key


def test_two_gloo_ranks_stream_under_max_memory(tmp_path, monkeypatch):
    """Streaming under torchrun, activations on disk: each process reads one block at a time, rank 0
    alone writes, and the artifact is the 1-process in-memory one (Wanda: same masks, same weights)."""
    make_tiny("llama", tmp_path / "llama")
    monkeypatch.chdir(tmp_path)
    args = ["--method", "wanda", "--scheme", "2:4", "--samples", "8", "--seq-len", "32", "--batch-size", "2"]
    one, two, stderr = two_beside_one(["llama", "-o", "two", *args, "--max-memory", "64MB", "--activations", "disk"],
                                      ["llama", "-o", "one", *args], tmp_path)
    assert stderr.count("streaming: planned peak") == 1 and "activations on disk" in stderr  # rank 0's line
    assert two["timing"]["processes"] == 2 and two["streaming"]["activations"] == "disk"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "one", "two"]  # scratch gone, rank 1 wrote nothing
    for key in ("tensors", "tied", "totals", "plan", "calibration"):
        assert one[key] == two[key], key
    a, b = read_tensors(tmp_path / "one"), read_tensors(tmp_path / "two")  # the streamed one is sharded
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
