"""`sparsify bench` end to end on tiny models: generation rows against the dense source (prefill and
decode at batch 1 and 8 for a causal LM, images/s at batch 1 and 32 for a ViT), memory per model,
the fallback to the dense twin when the source is gone, --cache-dense, and bad input. Fields and
signs only: no timing thresholds (the machine is shared)."""
import shutil

import pytest
from helpers import cli, cli_json
from tiny_models import make_tiny

FAST = ["--tokens", "1", "--prompt-len", "8", "--decode-tokens", "2", "--reps", "1"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for family, extra in (("llama", ["--quant", "int4", "--group-size", "32"]), ("vit", [])):
        src = make_tiny(family, root / family)
        out[family] = (src, root / f"{family}-art")
        cli("prune", src, "--method", "magnitude", "--scheme", "2:4", *extra, "-o", out[family][1])
    return out


def test_causal_lm_generation_against_the_source(artifacts):
    src, art = artifacts["llama"]
    r = cli_json("bench", art, *FAST)
    g = r["generation"]
    assert g["dense_model"] == str(src) and g["unit"] == "tokens/s" and (g["prompt_len"], g["decode_tokens"]) == (8, 2)
    assert [(row["phase"], row["batch"]) for row in g["rows"]] == [("prefill", 1), ("decode", 1), ("decode", 8)]
    for row in g["rows"]:
        assert row["sparse_per_s"] > 0 and row["dense_per_s"] > 0 and row["speedup"]["sparse"] > 0
    for name in ("sparse", "dense"):
        assert g["memory"][name]["weights_bytes"] > 0 and g["memory"][name]["rss_growth_bytes"] >= 0
    assert g["memory"]["sparse"]["weights_bytes"] < g["memory"]["dense"]["weights_bytes"]  # packed int4
    assert g["memory"]["process_peak_rss_bytes"] > 0 and r["cpu_cache_dense"] is False
    text = cli("bench", art, *FAST).stdout
    assert "end to end against" in text and "decode" in text and "memory" in text


def test_image_model_images_per_second(artifacts):
    _, art = artifacts["vit"]
    g = cli_json("bench", art, *FAST)["generation"]
    assert g["unit"] == "images/s" and g["decode_tokens"] is None
    assert [(row["phase"], row["batch"]) for row in g["rows"]] == [("forward", 1), ("forward", 32)]
    assert all(row["sparse_per_s"] > 0 and row["dense_per_s"] > 0 for row in g["rows"])


def test_without_the_source_the_dense_twin_and_cache_dense(artifacts, tmp_path, monkeypatch):
    src, art = artifacts["llama"]
    import torch

    moved, threads = tmp_path / "src", torch.get_num_threads()
    monkeypatch.setenv("SPARSIFY_CPU_CACHE", "0")  # --cache-dense sets it for the process: undone at teardown
    shutil.move(src, moved)  # the manifest's source is gone
    try:
        r = cli_json("bench", art, *FAST, "--cache-dense", "--threads", "1")
    finally:  # so is --threads
        shutil.move(moved, src)
        torch.set_num_threads(threads)
    assert r["generation"]["dense_model"].startswith("dense twin") and r["torch_threads"] == 1
    assert r["cpu_cache_dense"] is True and r["generation"]["rows"][0]["sparse_per_s"] > 0


@pytest.mark.parametrize("args", [["--decode-tokens", "0"], ["--threads", "0"], ["--tokens", "0"]])
def test_bad_bench_numbers_are_one_line(artifacts, args):
    result = cli("bench", artifacts["llama"][1], *args, code=2)
    assert "must be at least 1" in result.stderr and len(result.stderr.strip().splitlines()) == 1
