"""Data-parallel calibration helpers: the all-reduce of every accumulator over 2 gloo ranks against the
windows concatenated in one process, failure agreement, and what one process does (nothing)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_worker import BATCHES, HEADS, IN, KV, T, accumulate, finish, start, state, windows

from sparsify.calibrate import distributed
from sparsify.config import PruneConfig
from sparsify.errors import UserError

ROOT = Path(__file__).resolve().parents[2]

U = 2.0 ** -24  # fp32 unit roundoff: one rounding changes a value by at most U times its size


def reference() -> dict[str, torch.Tensor]:
    """The statistics of all windows concatenated, in float64 (the exact sums, as far as fp32 can tell)."""
    b = windows()
    X = torch.cat([w["x"].reshape(-1, IN) for w in b]).double()  # (tokens, in)
    q = torch.cat([w["q"] for w in b]).double()  # (B, heads, T, d)
    k = torch.cat([w["k"] for w in b]).double()  # (B, kv, T, d)
    qg = q.reshape(q.shape[0], KV, HEADS // KV, *q.shape[2:])  # (B, kv, group, T, d)
    return {"sumsq": (X * X).sum(0), "H": 2 / X.shape[0] * X.T @ X, "absH": 2 / X.shape[0] * X.abs().T @ X.abs(),
            "qk": (qg * k[:, :, None]).abs().sum((0, 2, 3)), "q": qg.abs().sum((0, 2, 3)), "k": k.abs().sum((0, 2)),
            "kmin": k.amin((0, 2)).float(), "kmax": k.amax((0, 2)).float(), "tokens": X.shape[0]}


def test_two_gloo_ranks_reduce_to_the_statistics_of_all_windows(tmp_path):
    proc = start([ROOT / "tests" / "distributed_worker.py", tmp_path], ROOT)
    _, stderr = finish(proc, timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for key, value in ranks[0].items():  # every rank holds the same reduced bits
        assert torch.equal(value, ranks[1][key]) if torch.is_tensor(value) else key in ("agreed", "shard"), key
    got, one, ref = ranks[0], state(accumulate(windows())), reference()
    tokens = ref["tokens"]  # the ColumnNorm filed under q_proj and k_proj was reduced once, not twice
    assert int(got["norm_tokens"]) == int(got["h_tokens"]) == int(got["qk_tokens"]) == tokens
    # Sums of non-negative terms: each of the m roundings on the way (the product, one per term of a
    # batch, one per batch in whatever order the ranks add them, the reduce's own) moves the sum by at
    # most U of it, so the 2-rank and the 1-process fp32 sums both lie within m U of the exact one.
    tok, pairs = 2 * T, 2 * T * HEADS // KV  # terms per batch: tokens (x, k), query-key pairs (qk, q)
    for key, terms in (("sumsq", tok), ("qk", pairs), ("q", pairs), ("k", tok)):
        for fp32 in (got[key], one[key]):
            assert ((fp32.double() - ref[key]).abs() <= (terms + BATCHES + 2) * U * ref[key]).all(), key
    # The Hessian's entries have both signs: the bound is relative to the sum of |terms|, (2/n) |X|^T |X|,
    # with m = the batch's products + 3 roundings of the running average and 1 addition per batch + 3 in
    # the reduce (x tokens, the sum, / total); the ranks' token counts differ, so the weighting shows.
    m = tok + 4 * BATCHES + 3
    for fp32 in (got["H"], one["H"]):
        assert ((fp32.double() - ref["H"]).abs() <= m * U * ref["absH"]).all()
    assert torch.equal(got["kmin"], ref["kmin"]) and torch.equal(got["kmax"], ref["kmax"])  # min / max: exact
    assert ranks[0]["agreed"] == "stopped: process 1 of 2 failed (see its own error line) [exit 2]"
    assert ranks[1]["agreed"] == "rank 1 alone failed [exit 2]"
    assert ranks[0]["shard"].startswith("2 processes need 2 calibration batches or more, this run has 1")


def test_one_process_changes_nothing():
    batches = [{"x": 1}, {"x": 2}]
    assert distributed.shard(batches) is batches and distributed.world() == 1 and distributed.is_main()
    acc = accumulate(windows())
    before = {k: v.clone() for k, v in state(acc).items()}
    distributed.reduce_stats({"targets": {"a": acc["norm"], "b": None}, "observed": {"ds": {"attn": acc["qk"]}}})
    assert all(torch.equal(before[k], v) for k, v in state(acc).items())
    with pytest.raises(ValueError, match="mine"), distributed.agreed():
        raise ValueError("mine")
    calls = []
    assert distributed.main_first(lambda x: calls.append(x) or x, 3) == 3 and calls == [3]
    with pytest.raises(TypeError, match="no reduce"):
        distributed.reduce_stats({"targets": {"a": object()}})


def test_what_cannot_run_data_parallel_is_refused_before_any_process_group(monkeypatch):
    ok = PruneConfig(allocation="owl")
    distributed.check_supported(PruneConfig(distill_steps=2))  # not under torchrun: nothing to refuse
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "localhost",
                       "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    assert distributed.launched()
    distributed.check_supported(ok)
    for config, message in ((PruneConfig(distill_steps=2), "--distill-steps is not supported with torchrun"),
                            (PruneConfig(allocation="ecoflap"), "--allocation ecoflap is not supported with torchrun"),
                            (PruneConfig(allocation="lpvit"), "--save-allocation FILE and pass --plan FILE"),
                            (PruneConfig(device="cuda:1"), "pass --device cuda, each process takes"),
                            (PruneConfig(device="cuda"), "needs GPU 1")):
        if config.device == "cuda" and torch.cuda.device_count() > 1:
            continue
        with pytest.raises(UserError, match=message):
            distributed.check_supported(config)
