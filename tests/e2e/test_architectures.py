"""Twelve more architectures through the library path: prune -> load -> evaluate -> export.

Tiny random checkpoints (tests/tiny_models.py `ARCHITECTURES`): GPT-2 (Conv1D), OPT, GPT-NeoX, Phi-3,
Falcon, Mixtral, Gemma-2, StarCoder2, OLMo-2, XLM-RoBERTa, DINOv2 (backbone), SigLIP. For each:
- magnitude 2:4: every target of the source is in the artifact, 2:4 along the input dimension of
  its (out, in) weight, keeping the two largest |w| of each group (so a Conv1D is read the right
  way round); the hf-dense export loads with plain transformers and computes what the artifact does;
- Wanda unstructured 0.5, calibrated: the artifact's masks are the ones a plain sequential
  reference gets from whole-model forwards (earlier blocks already pruned) over the same batches.
  That checks the block-by-block runner against the model itself, including the per-block
  arguments that differ between blocks (Gemma-2 alternates sliding-window and full attention,
  and its window of 8 is shorter than the 32-token calibration windows);
- `sparsify.evaluate`: perplexity for causal LMs, agreement with the dense source for every family.
"""
from __future__ import annotations

import pytest
import torch
from helpers import dense_weights, nm_ok
from tiny_models import ARCHITECTURES, VOCAB, make_tiny

import sparsify
from sparsify.config import CalibConfig, PruneConfig, Scheme

ARCHS = list(ARCHITECTURES)
CALIB = CalibConfig(samples=4, seq_len=32, batch_size=2, seed=0)
EVAL = {"seq_len": 32, "max_windows": 2, "batch_size": 2}
# float32. On the CPU the packed path unpacks and runs the same matmul as transformers (measured:
# bit-identical for all twelve). A kernel that sums in another order (Triton, addmm for Conv1D) moves
# each 64-128 long dot product by a few ulps (~1e-7 relative); through two blocks, norms and softmax
# that stays well below 1e-4 of the output's scale; a transposed or mis-masked weight changes every
# output it feeds by a share of its whole magnitude.
RTOL = 1e-4


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    return {arch: make_tiny(arch, root / arch, seed=0) for arch in ARCHS}


def _prune(src, out, method: str, scheme: str) -> dict:
    config = PruneConfig(method=method, scheme=Scheme.parse(scheme), sparsity=0.5, calib=CALIB)
    return sparsify.prune(str(src), config, out)


def _source(src):
    from sparsify.models.load import load_model, resolve

    return load_model(resolve(str(src)))


def _targets(model) -> dict[str, str]:
    """{target name: block} in forward order."""
    from sparsify.models.layout import find_targets

    return {name: block for block, names in find_targets(model).items() for name in names}


def _inputs(family, image_size: int | None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (2, 16), generator=g)  # (2, T): no special tokens
    pixels = torch.randn(2, 3, image_size or 32, image_size or 32, generator=g)  # (2, 3, S, S)
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"text": text, "image": {"pixel_values": pixels}, "image-text": {**text, "pixel_values": pixels}}[
        family.inputs]


def _outputs(out) -> dict[str, torch.Tensor]:
    """Every float tensor of a model output (logits, hidden states, embeddings; no caches)."""
    return {k: v for k, v in out.items() if torch.is_tensor(v) and v.is_floating_point()}


@pytest.mark.parametrize("arch", ARCHS)
def test_magnitude_24_and_hf_dense(sources, arch, tmp_path):
    import transformers

    from sparsify.exporters.hf_dense import export_hf_dense
    from sparsify.models.targets import layout_of, weight_of

    src = _source(sources[arch])
    targets = _targets(src.model)
    manifest = _prune(sources[arch], tmp_path / "out", "magnitude", "2:4")
    weights = dense_weights(tmp_path / "out")
    assert sorted(weights) == sorted(targets)  # every target of the source, nothing else
    layouts = {e["module"]: e["layout"] for e in manifest["tensors"].values()}
    for name, w in weights.items():
        module = src.model.get_submodule(name)
        assert layouts[name] == layout_of(module), name
        dense = weight_of(module)  # (out, in) of the source
        assert w.shape == dense.shape and nm_ok(w, 2, 4) and (w == 0).float().mean() == 0.5, name
        groups = dense.abs().reshape(dense.shape[0], -1, 4)  # (out, G, 4)
        kept = (w != 0).reshape(groups.shape)
        top2 = torch.zeros_like(kept).scatter_(-1, groups.topk(2, -1).indices, True)
        assert torch.equal(kept, top2) and torch.equal(w[w != 0], dense[w != 0]), name
    if arch == "gpt2":
        conv = {n for n, lay in layouts.items() if lay == "conv1d"}
        assert {n.rsplit(".", 1)[-1] for n in conv} == {"c_attn", "c_proj", "c_fc"} and len(conv) == 8
    if arch == "mixtral":  # experts are fused 3-D parameters, not Linears: attention only, experts untouched
        assert all(".self_attn." in n for n in weights)
        loaded, _ = sparsify.load(tmp_path / "out")
        expert = "model.layers.0.mlp.experts.gate_up_proj"
        assert torch.equal(loaded.model.get_parameter(expert), src.model.get_parameter(expert))
    # the hf-dense export loads with plain transformers and computes what the artifact computes
    export_hf_dense(tmp_path / "out", tmp_path / "dense")
    loaded, _ = sparsify.load(tmp_path / "out")
    cls = getattr(transformers, src.model.config.architectures[0])
    plain = cls.from_pretrained(tmp_path / "dense").eval()
    for name, w in weights.items():
        assert type(plain.get_submodule(name)) is type(src.model.get_submodule(name)), name  # Conv1D stays Conv1D
        assert torch.equal(weight_of(plain.get_submodule(name)), w), name
    x = _inputs(src.family, src.image_size)
    with torch.inference_mode():
        got, want = _outputs(loaded.model(**x)), _outputs(plain(**x))
    assert got.keys() == want.keys() and got
    for key in want:
        scale = want[key].abs().max().item()
        torch.testing.assert_close(got[key], want[key], rtol=RTOL, atol=RTOL * scale, msg=f"{arch} {key}")


def _column_sumsq(model, names: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    """Sum over every calibration token of x_j^2 for each target's input column j (float64)."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(_m, inputs, _out):
            x = inputs[0].double().reshape(-1, inputs[0].shape[-1])  # (tokens, in)
            sums[name] = sums.get(name, 0) + (x * x).sum(0)  # (in,)
        return add

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for batch in batches:
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return sums


@pytest.mark.parametrize("arch", ARCHS)
def test_wanda_matches_sequential_reference(sources, arch, tmp_path):
    from sparsify.calibrate.batches import calibration_batches
    from sparsify.models.targets import set_weight, weight_of

    manifest = _prune(sources[arch], tmp_path / "out", "wanda", "unstructured")
    assert manifest["calibration"]["samples"] == CALIB.samples
    weights = dense_weights(tmp_path / "out")
    src = _source(sources[arch])
    blocks: dict[str, list[str]] = {}
    for name, block in _targets(src.model).items():
        blocks.setdefault(block, []).append(name)
    assert sorted(weights) == sorted(n for names in blocks.values() for n in names)
    batches = calibration_batches(src, CALIB)
    if arch == "siglip":  # SigLIP pools the last position: captions padded to its full text length
        assert all(b["input_ids"].shape[1] == src.config.text_config.max_position_embeddings for b in batches)
    for names in blocks.values():  # in forward order; earlier blocks already hold the artifact's weights
        sumsq = _column_sumsq(src.model, names, batches)
        for name in names:
            module, w = src.model.get_submodule(name), weights[name]
            dense = weight_of(module)  # (out, in)
            kept = w != 0
            assert torch.equal(w[kept], dense[kept]), name  # Wanda updates no weight
            assert (kept.sum(1) == w.shape[1] // 2).all(), name  # exactly half of every row
            score = dense.double().abs() * sumsq[name].sqrt()  # (out, in), Wanda's score up to a constant
            worst_kept = score.masked_fill(~kept, float("inf")).amin(1)  # (out,)
            best_pruned = score.masked_fill(kept, float("-inf")).amax(1)  # (out,)
            assert (best_pruned <= worst_kept * (1 + 1e-5)).all(), f"{arch} {name}: mask differs from the reference"
            set_weight(module, w)
    result = sparsify.evaluate(str(tmp_path / "out"), baseline=str(sources[arch]), **EVAL)
    assert result["family"] == src.family.name and result["size"]["sparsity"] == pytest.approx(0.5)
    agreement = result["agreement"]
    if src.family.name == "causal-lm":
        assert result["task"] == "perplexity" and 1 < result["perplexity"]["perplexity"] < 10 * VOCAB
        assert agreement["kl"] >= 0 and 0 <= agreement["top1"] <= 1
    else:
        assert result["task"] == "agreement" and -1 <= agreement["cosine"] <= 1 + 1e-6


@pytest.mark.parametrize("arch,output", [("gpt2", "logits"), ("falcon", "logits"), ("mixtral", "logits"),
                                         ("gemma2", "logits"), ("dinov2", "last_hidden_state")])
def test_onnx_export(sources, arch, output, tmp_path):
    """Conv1D targets (GPT-2), an image backbone (DINOv2) and decoders with the KV cache (Falcon's fused
    attention, Mixtral's experts, Gemma-2's sliding window, shorter than prompt + 16 tokens) export to
    ONNX, checked by onnxruntime on export (decoders: greedy generation of 16 tokens, token for token)."""
    pytest.importorskip("onnxruntime")
    from sparsify.exporters.onnx import export_onnx

    manifest = _prune(sources[arch], tmp_path / "out", "magnitude", "2:4")
    result = export_onnx(tmp_path / "out", tmp_path / "onnx" / "model.onnx")
    assert result["verified"] and result["outputs"][0] == output
    if output == "logits":
        assert result["kv_cache"] and result["greedy_match"] and len(result["outputs"]) == 1 + 2 * 2
    assert result["targeted"] == manifest["totals"]["targets"]
