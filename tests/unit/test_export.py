"""ONNX export: the integer-initializer rewrite against numpy references, and whole tiny-Llama exports
(INT8 initializers, 2:4 after dequantization, bytes, errors vs PyTorch, w8a8 activations, failure modes)."""
from __future__ import annotations

import sys

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from tiny_models import make_tiny

import sparsify
from sparsify.errors import UserError
from sparsify.exporters import onnx as onnx_export
from sparsify.exporters.onnx import export_onnx
from sparsify.exporters.onnx_quant import QuantWeight, find_initializers, quantize_graph, weight_codes

# ---------------------------------------------------------------- the rewrite on one-MatMul graphs


def _quantized_weight(rng, out, inp, kind, group, symmetric, act=None, input_scale=None) -> QuantWeight:
    """A random 2:4 weight that lies exactly on a random (code - zero) * scale grid."""
    ng = -(-inp // group)
    scale = rng.uniform(0.01, 0.1, (out, ng)).astype(np.float32)
    zero = None
    if kind == "int8":
        codes = rng.integers(-127, 128, (out, inp)).astype(np.float32)
    elif kind == "fp8":
        codes = np.clip(rng.normal(0, 100, (out, inp)), -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    elif symmetric:
        codes = rng.integers(0, 16, (out, inp)).astype(np.float32) - 8
    else:
        zero = rng.integers(0, 16, (out, ng)).astype(np.uint8)
        codes = rng.integers(0, 16, (out, inp)).astype(np.float32) - np.repeat(zero, group, 1)[:, :inp]
    keep = np.argsort(rng.random((out, inp // 4, 4)), -1)[..., :2]  # 2 kept of every 4 inputs
    mask = np.zeros((out, inp // 4, 4), bool)
    np.put_along_axis(mask, keep, True, -1)
    weight = codes * mask.reshape(out, inp) * np.repeat(scale, group, 1)[:, :inp]  # (out, in)
    return QuantWeight(weight.astype(np.float32), kind, scale, zero, group, act, input_scale)


def _linear_graph(w: np.ndarray, layout: str, opset: int) -> ir.Model:
    """y = x @ W.T as MatMul with a (in, out) initializer, or Gemm(transB=1) with the (out, in) weight."""
    out, inp = w.shape
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["tokens", inp]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": opset}, name="linear")
    arr = np.ascontiguousarray(w.T if layout == "io" else w)
    init = ir.Value(name="weight", const_value=ir.tensor(arr, name="weight"))
    graph.register_initializer(init)
    node = ir.node("MatMul", [x, init]) if layout == "io" else ir.node("Gemm", [x, init], {"transB": 1})
    graph.append(node)
    node.outputs[0].name = "y"
    graph.outputs.append(node.outputs[0])
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray, path) -> np.ndarray:
    ir.save(model, path)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(str(path), options).run(None, {"x": x})[0]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), out=st.integers(1, 6), blocks=st.integers(1, 6),
       layout=st.sampled_from(["io", "oi"]), kind=st.sampled_from(["int8", "int4", "int4-asym", "fp8"]),
       group=st.sampled_from([0, 8, 16]))
def test_rewrite_matches_float_matmul(tmp_path_factory, seed, out, blocks, layout, kind, group):
    rng = np.random.default_rng(seed)
    out, inp = 4 * out, 8 * blocks
    base = kind.removesuffix("-asym")
    group = inp if base != "int4" or group == 0 else group
    w = _quantized_weight(rng, out, inp, base, group, not kind.endswith("asym"))
    model = _linear_graph(w.weight, layout, 21)
    quantize_graph(model, {"lin": w}, 21)
    inits = {v.name: v.const_value for v in model.graph.initializers.values()}
    assert "weight" not in inits  # the float weight is gone, only codes and scales remain
    expected = {"int8": ir.DataType.INT8, "fp8": ir.DataType.FLOAT8E4M3FN,
                "int4": ir.DataType.INT4 if w.zero is None else ir.DataType.UINT4}[base]
    assert inits["weight.quantized"].dtype == expected
    x = rng.standard_normal((5, inp)).astype(np.float32)
    y = _run(model, x, tmp_path_factory.mktemp("g") / "m.onnx")
    np.testing.assert_allclose(y, x @ w.weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [18, 21])
@pytest.mark.parametrize("input_scale", [None, 0.02])
def test_w8a8_activation_rounding_matches_numpy(tmp_path, input_scale, opset):
    rng = np.random.default_rng(1)
    w = _quantized_weight(rng, 8, 16, "int8", 16, True, act="int8", input_scale=input_scale)
    model = _linear_graph(w.weight, "io", opset)
    quantize_graph(model, {"lin": w}, opset)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph) == 1
    x = rng.standard_normal((7, 16)).astype(np.float32)
    x[3] = 0.0  # an all-zero token must not divide by zero
    s = np.float32(input_scale) if input_scale else np.maximum(np.abs(x).max(1, keepdims=True) / np.float32(127), 1e-8)
    xq = np.clip(np.round(x / s), -127, 127) * s  # (tokens, in) per-token (or per-tensor) int8 rounding
    y = _run(model, x, tmp_path / "m.onnx")
    np.testing.assert_allclose(y, xq @ w.weight.T, rtol=1e-5, atol=1e-5)
    assert np.abs(y - x @ w.weight.T).max() > 1e-4  # the activations really were rounded


def test_rewrite_refuses_inconsistent_weights():
    rng = np.random.default_rng(2)
    w = _quantized_weight(rng, 4, 8, "int8", 8, True)
    w.weight = w.weight + np.float32(1e-3) * (w.weight != 0)  # off the scale grid
    with pytest.raises(RuntimeError, match="grid"):
        weight_codes(w)
    model = _linear_graph(np.ones((4, 8), np.float32), "io", 18)
    with pytest.raises(RuntimeError, match="no initializer"):
        find_initializers(model.graph, {"lin": w})


# ---------------------------------------------------------------- whole exports of a tiny Llama


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    src = make_tiny("llama", root / "llama")
    out = {}
    for quant in ("int8", "w8a8", "int4"):
        out[quant] = root / f"art-{quant}"
        sparsify.prune(str(src), sparsify.PruneConfig(method="magnitude", scheme="2:4", quant=quant), out[quant])
    return out


def _dequantized(path) -> dict[str, np.ndarray]:
    """Independent reader: every DequantizeLinear on an initializer, dequantized with numpy."""
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    out = {}
    for node in m.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
            s = numpy_helper.to_array(inits[node.input[1]])
            axis = {a.name: a.i for a in node.attribute}["axis"]
            shape = [1, 1]
            shape[axis] = -1
            out[node.output[0]] = (inits[node.input[0]].data_type, q * s.reshape(shape), axis)
    return out


def test_int8_export_is_int8_24_and_matches_pytorch(artifacts, tmp_path):
    r = export_onnx(artifacts["int8"], tmp_path / "o" / "model.onnx")
    assert r["verified"] and r["max_rel_error"] <= r["tolerance"] == 1e-4
    assert r["files"] == ["model.onnx"] and {"config.json", "tokenizer.json"} <= set(r["side_files"])
    deq = _dequantized(tmp_path / "o" / "model.onnx")
    assert len(deq) == r["targeted"] == 2 * 7
    dense = {n: m.dense_weight().numpy() for n, m in sparsify.load(artifacts["int8"])[0].model.named_modules()
             if hasattr(m, "dense_weight")}
    for dtype, w, out_axis in deq.values():
        assert dtype == onnx.TensorProto.INT8
        w_oi = w if out_axis == 0 else w.T  # (out, in)
        assert ((w_oi != 0).reshape(w_oi.shape[0], -1, 4).sum(-1) <= 2).all()  # 2:4 survives dequantization
        assert any(d.shape == w_oi.shape and np.array_equal(d, w_oi) for d in dense.values())
    assert r["targeted_bytes"] <= 0.27 * r["targeted_fp32_bytes"] and r["size_vs_fp32"] < 1
    # dynamic axes: another batch and length than the export saw, against the artifact in PyTorch
    from sparsify.eval.onnx_model import open_onnx

    model = open_onnx(tmp_path / "o" / "model.onnx")[0].model
    weights = model.weights()  # dequantized from the file, by module name
    assert weights.keys() == dense.keys() and all(torch.equal(torch.from_numpy(dense[k]), weights[k]) for k in dense)
    ids = torch.randint(0, 512, (3, 5))
    with torch.no_grad():
        ref = sparsify.load(artifacts["int8"])[0].model(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_w8a8_export_quantizes_activations(artifacts, tmp_path):
    r = export_onnx(artifacts["w8a8"], tmp_path / "w8a8.onnx", external_data=True)
    assert r["files"] == ["w8a8.onnx", "w8a8.onnx.data"] and r["quant"] == "w8a8" and r["verified"]
    m = onnx.load(str(tmp_path / "w8a8.onnx"))  # loads the external data from beside it
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("QuantizeLinear") == 2 * 4  # per block: shared q/k/v input, o, shared gate/up input, down
    from sparsify.eval.onnx_model import OnnxModel
    from sparsify.runtime.densify import densify

    model = sparsify.load(artifacts["w8a8"])[0].model
    ids = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        runtime = model(input_ids=ids).logits  # the artifact's own kernels round the activations
        plain = densify(model)(input_ids=ids).logits  # plain Linears: no activation rounding
    got = OnnxModel(tmp_path / "w8a8.onnx")(input_ids=ids).logits.numpy()  # a cache graph: empty pasts
    np.testing.assert_allclose(got, runtime.numpy(), rtol=1e-3, atol=1e-3 * runtime.abs().max().item())
    assert np.abs(got - plain.numpy()).max() > 10 * np.abs(got - runtime.numpy()).max()


def test_torchscript_fallback_and_failed_verification(artifacts, tmp_path, monkeypatch):
    export = torch.onnx.export

    def no_dynamo(*args, **kwargs):  # the dynamo exporter failing sends the trace through TorchScript
        if kwargs.get("dynamo", True):
            raise RuntimeError("dynamo export failed")
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    r = export_onnx(artifacts["int8"], tmp_path / "ts" / "model.onnx")  # verified on other shapes than traced
    assert r["verified"] and len(_dequantized(tmp_path / "ts" / "model.onnx")) == 2 * 7
    real = onnx_export._reference
    monkeypatch.setattr(onnx_export, "_reference",
                        lambda *a: {k: v + 1e-2 * v.abs().max() for k, v in real(*a).items()})
    with pytest.raises(UserError, match="tolerance"):
        export_onnx(artifacts["int8"], tmp_path / "new" / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ts"]  # nothing left behind, no temp directory
    with pytest.raises(UserError, match="tolerance"):
        export_onnx(artifacts["int8"], tmp_path / "ts" / "other.onnx")
    assert sorted(p.name for p in (tmp_path / "ts").iterdir()) == sorted(["model.onnx", *r["side_files"]])


def test_user_errors(artifacts, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="opset"):
        export_onnx(artifacts["int8"], tmp_path / "a.onnx", opset=17)
    with pytest.raises(UserError, match="need opset 21"):
        export_onnx(artifacts["int4"], tmp_path / "a.onnx", opset=18)
    (tmp_path / "b.onnx").write_bytes(b"")
    with pytest.raises(UserError, match="already exists"):
        export_onnx(artifacts["int8"], tmp_path / "b.onnx")
    with pytest.raises(UserError, match="not a sparsify artifact"):
        export_onnx(tmp_path, tmp_path / "c.onnx")
    monkeypatch.setattr(onnx_export, "PROTO_LIMIT", 1000)
    with pytest.raises(UserError, match="external data"):
        export_onnx(artifacts["int8"], tmp_path / "e.onnx", external_data=False, verify=False)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match="pip install .*onnxruntime"):
        export_onnx(artifacts["int8"], tmp_path / "d.onnx")
    from sparsify.eval.onnx_model import ort_session

    with pytest.raises(UserError, match="pip install onnxruntime"):
        ort_session(tmp_path / "b.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.onnx"]


def test_unsupported_family_is_a_user_error():
    from types import SimpleNamespace

    from sparsify.models.family import Family

    loaded = SimpleNamespace(family=Family("seq2seq", "text", "AutoModel"), model=torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="does not support the seq2seq family"):
        onnx_export.graph_io(loaded)


# ---------------------------------------------------------------- hf-dense


def test_hf_dense_is_the_artifact_in_plain_transformers(artifacts, tmp_path):
    from transformers import AutoModelForCausalLM

    from sparsify.exporters.hf_dense import export_hf_dense

    r = export_hf_dense(artifacts["int4"], tmp_path / "dense")
    assert r["dequantized"] == r["dense_layers"] == 2 * 7 and r["sparsity"] >= 0.5
    assert "sparsify.json" not in r["files"]
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= set(r["files"])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    loaded = sparsify.load(artifacts["int4"])[0].model
    ids = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    for name, m in loaded.named_modules():
        if hasattr(m, "dense_weight"):  # zeros and dequantized values, bit for bit
            assert torch.equal(plain.get_submodule(name).weight, m.dense_weight()), name
    with pytest.raises(UserError, match="already exists"):
        export_hf_dense(artifacts["int4"], tmp_path / "dense")
    with pytest.raises(UserError, match="overlaps the artifact"):
        export_hf_dense(artifacts["int4"], artifacts["int4"] / "inner")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]
