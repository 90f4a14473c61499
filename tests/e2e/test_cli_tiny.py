"""CLI end to end on tiny random Llama / BERT / ViT / CLIP checkpoints: prune -> info -> eval -> load."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import SMALL_CALIB, cli, cli_json, dense_weights, nm_ok
from tiny_models import make_tiny

FAMILIES = ["llama", "bert", "vit", "clip"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny(f, root / f) for f in FAMILIES}


def _inputs(family: str, loaded):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (2, 12), generator=g)
    pixels = torch.randn(2, 3, loaded.image_size or 32, loaded.image_size or 32, generator=g)
    return {"llama": {"input_ids": ids}, "bert": {"input_ids": ids},
            "vit": {"pixel_values": pixels}, "clip": {"input_ids": ids, "pixel_values": pixels}}[family]


def _outputs(out) -> torch.Tensor:
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise AssertionError(f"no output tensor in {type(out)}")


@pytest.mark.parametrize("family", FAMILIES)
def test_wanda_24_end_to_end(tiny, family, tmp_path):
    import sparsify
    from sparsify.models.load import load_model, resolve

    out = tmp_path / "out"
    manifest = cli_json("prune", tiny[family], "--method", "wanda", "--scheme", "2:4", "-o", out, *SMALL_CALIB)
    assert (out / "sparsify.json").is_file() and (out / "config.json").is_file()
    assert manifest["totals"]["targets"] > 0 and manifest["config"]["scheme"] == "2:4"
    assert json.loads((out / "sparsify.json").read_text())["tensors"].keys() == manifest["tensors"].keys()
    weights = dense_weights(out)
    assert set(weights) == {e["module"] for e in manifest["tensors"].values()}
    for name, w in weights.items():
        assert nm_ok(w, 2, 4), name
        assert (w == 0).float().mean() == 0.5, name
    # The artifact runs through SparseLinear and matches the masked dense model.
    loaded, _ = sparsify.load(out)
    dense = load_model(resolve(str(tiny[family])))
    state = dense.model.state_dict()
    for name, w in weights.items():
        state[f"{name}.weight"].copy_(w)
    x = _inputs(family, loaded)
    with torch.inference_mode():
        got, want = _outputs(loaded.model(**x)), _outputs(dense.model(**x))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    info = cli("info", out).stdout
    assert "wanda" in info and "2:4" in info
    result = cli_json("eval", out, "--windows", "2", "--seq-len", "32")
    assert result["size"]["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("method,scheme", [("magnitude", "unstructured"), ("sparsegpt", "4:8"),
                                           ("sparsegpt", "unstructured"), ("wanda", "unstructured")])
def test_methods_on_llama(tiny, tmp_path, method, scheme):
    out = tmp_path / "out"
    m = cli_json("prune", tiny["llama"], "--method", method, "--scheme", scheme, "--sparsity", "0.5",
                 "-o", out, *SMALL_CALIB)
    for entry in m["tensors"].values():  # exact 50%, plus any weight a method drove to exactly zero
        assert 0.5 - 1e-9 <= entry["sparsity"] <= 0.51
    assert (m["calibration"] is None) == (method == "magnitude")
    ppl = cli_json("eval", out, "--windows", "2", "--seq-len", "32")["perplexity"]
    assert ppl["perplexity"] > 1 and ppl["seq_len"] == 32


def test_bare_safetensors_magnitude(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "weights.safetensors"
    save_file(load_file(tiny["llama"] / "model.safetensors"), src)  # no config.json beside it
    out = tmp_path / "out"
    m = cli_json("prune", src, "--scheme", "2:4", "-o", out)
    assert m["config"]["method"] == "magnitude" and m["totals"]["targets"] > 0
    assert all("layers." in name for name in m["tensors"])
    assert m["totals"]["ratio"] <= 0.57


def test_bench_and_report(tiny, tmp_path):
    out = tmp_path / "out"
    cli("prune", tiny["llama"], "--method", "magnitude", "--scheme", "2:4", "-o", out)
    r = cli_json("bench", out, "--tokens", "1", "--tokens", "4", "--prompt-len", "8", "--reps", "1", "--no-generation")
    shapes = {tuple(row["shape"]) for row in r["layers"]}
    from sparsify.kernels.cpu import native

    fast = "cpu-unpack" if native.unavailable() else "cpu-nm24"  # 2:4 float32 at decode sizes: the C kernel
    assert shapes == {(64, 64), (32, 64), (128, 64), (64, 128)} and all(row["kernel"] == fast for row in r["layers"])
    assert r["generation"] is None
    assert {(f["phase"], f["model"]) for f in r["forward"]} == {(p, m) for p in ("prefill", "decode") for m in ("sparse", "dense")}
    assert r["bytes_limit"] == pytest.approx(1 / 0.53125, rel=1e-3)  # 2:4 fp32: values + 2-bit meta
    assert "whole model" in cli("bench", out, "--tokens", "1", "--prompt-len", "8", "--reps", "1", "--no-generation").stdout
    rep = cli_json("eval", out, "--windows", "1", "--seq-len", "16", "--report", tmp_path / "rep")
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["eval.json", "sparsity.png"]
    assert rep["report_files"]


@pytest.mark.parametrize("mode", ["end-to-end", "block-wise"])
def test_distill_from_the_cli_keeps_the_mask(tiny, tmp_path, mode):
    """--distill-steps / --distill-mode reach the distiller; the artifact's weights stay exactly 2:4."""
    plain, distilled = tmp_path / "plain", tmp_path / "distilled"
    cli("prune", tiny["llama"], "--method", "magnitude", "--scheme", "2:4", "-o", plain, *SMALL_CALIB)
    m = cli_json("prune", tiny["llama"], "--method", "magnitude", "--scheme", "2:4", "-o", distilled, *SMALL_CALIB,
                 "--distill-steps", "2", "--distill-mode", mode, "--distill-lr", "1e-3")
    assert m["distill"]["mode"] == mode and m["distill"]["steps"] == 2 and m["config"]["distill_lr"] == 1e-3
    before, after = dense_weights(plain), dense_weights(distilled)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k] != 0, after[k] != 0) for k in before)  # same mask, position by position
    assert any(not torch.equal(before[k], after[k]) for k in before)  # and the kept weights moved


@pytest.mark.parametrize("how", ["after", "fixed"])
def test_distill_with_int8_keeps_the_mask_and_the_grid(tiny, tmp_path, how):
    """--quant int8 with distillation: the manifest says how the grid entered; every artifact stays 2:4. With
    ``after`` it keeps the float run's mask exactly and every weight is a multiple of its row's scale
    fitted last (the row's largest weight is code 127); ``fixed``'s grid is checked in test_distill."""
    plain, out = tmp_path / "plain", tmp_path / how
    cli("prune", tiny["llama"], "--method", "magnitude", "--scheme", "2:4", "-o", plain, *SMALL_CALIB)
    m = cli_json("prune", tiny["llama"], "--method", "magnitude", "--scheme", "2:4", "--quant", "int8", "-o", out,
                 *SMALL_CALIB, "--distill-steps", "2", "--distill-lr", "1e-3", "--distill-quant", how)
    assert m["distill"]["quant"] == how and m["config"]["distill_quant"] == how
    before, after = dense_weights(plain), dense_weights(out)
    for k, w in after.items():
        assert int((w.reshape(-1, 4) != 0).sum(1).max()) <= 2, k
        if how == "fixed":
            continue
        assert torch.equal(before[k] != 0, w != 0), k  # pruned in float: the unquantized run's mask
        scale = w.abs().amax(1, keepdim=True) / 127  # (out, 1): the row's largest weight is code +-127
        codes = w / scale.clamp_min(1e-30)
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127 + 1e-3, k
