"""Rewrite an exported float ONNX graph so that quantized weights are stored as real integer initializers.

The exporter traces the densified model, so every compressed weight arrives as a float initializer,
either as the (out, in) weight itself or transposed to (in, out) for a MatMul. We find it by its exact
bytes, then replace it with integer codes + scales feeding a ``DequantizeLinear`` whose output carries
the old name, so the consumers are untouched:

  int8   INT8 codes, per-output-channel scale (``axis`` = the output axis of the initializer)
  int4   INT4 codes (symmetric: q = u - 8, no zero point) or UINT4 codes + UINT4 zero points,
         blockwise along the input axis (opset 21, ``block_size`` = group size)
  fp8    FLOAT8E4M3FN codes, per-output-channel scale (opset 19)
Pruned weights stay as exact zeros in the codes, so the N:M pattern survives dequantization.

w8a8 also quantizes the activation feeding each such MatMul / Gemm to codes in [-127, 127], as the
runtime does: per tensor with a static scale when the artifact holds one, else per token (scale =
max|x| / 127 over the input features) as a QuantizeLinear / DequantizeLinear pair on the rows of x
reshaped to (tokens, in).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

ACT_EPS = 1e-8  # smallest per-token activation scale (an all-zero token row)


@dataclass
class QuantWeight:
    """One compressed Linear as the exporter sees it.

    Args:
        weight: (out, in) float32, the exact dense (dequantized) weight in the traced graph.
        kind: None (float, left alone), "int8", "int4" or "fp8".
        scale: (out, ngroups) float32; zero: (out, ngroups) uint8 for asymmetric int4, else None.
        group_size: input columns per group (== in for per-channel).
        act: "int8" to quantize the activation too (w8a8); input_scale: static per-tensor scale or None.
        dtype: the artifact's dtype, in which ``weight`` was rounded after dequantization.
    """

    weight: np.ndarray
    kind: str | None = None
    scale: np.ndarray | None = None
    zero: np.ndarray | None = None
    group_size: int = 0
    act: str | None = None
    input_scale: float | None = None
    dtype: str = "float32"


def collect_weights(model: torch.nn.Module, manifest: dict) -> dict[str, QuantWeight]:
    """A `QuantWeight` for every SparseLinear of a loaded artifact (call before densifying it)."""
    from sparsify.runtime.densify import sparse_modules

    act = (manifest.get("quant") or {}).get("activations")
    weights = {}
    for name, m in sparse_modules(model).items():
        dense, kind, packed = m.dense_weight(), m.attrs.get("quant"), m.packed()  # dense: (out, in)
        w = QuantWeight(dense.float().numpy(), dtype=str(dense.dtype).removeprefix("torch."))
        if kind is not None:
            static = packed.get("input_scale", m.attrs.get("input_scale"))
            w.kind, w.scale, w.group_size = kind, packed["scale"].float().numpy(), m.attrs["group_size"]
            w.zero = packed["zero"].numpy() if "zero" in packed else None
            w.act, w.input_scale = m.attrs.get("activations") or act, None if static is None else float(static)
        weights[name] = w
    return weights


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()


def find_initializers(graph: ir.Graph, weights: dict[str, QuantWeight]) -> dict[str, tuple[ir.Value, str]]:
    """Module name -> (initializer value, layout "oi" for (out, in) or "io" for (in, out)), matched by bytes."""
    wanted: dict[tuple, list[tuple[str, str]]] = {}
    for name, w in weights.items():
        wanted.setdefault((w.weight.shape, _digest(w.weight)), []).append((name, "oi"))
        wanted.setdefault((w.weight.T.shape, _digest(w.weight.T)), []).append((name, "io"))
    shapes = {k[0] for k in wanted}
    found: dict[str, tuple[ir.Value, str]] = {}
    for value in list(graph.initializers.values()):
        t = value.const_value
        if t is None or t.dtype != ir.DataType.FLOAT or tuple(t.shape) not in shapes:
            continue
        for name, layout in wanted.get((tuple(t.shape), _digest(t.numpy())), []):
            if name not in found:
                found[name] = (value, layout)
                break
    missing = sorted(set(weights) - set(found))
    if missing:
        raise RuntimeError(f"ONNX export: no initializer holds the weight of {missing[0]} ({len(missing)} missing)")
    return found


def weight_codes(w: QuantWeight) -> np.ndarray:
    """(out, in) integer / fp8 codes such that (codes - zero) * scale == weight exactly (checked)."""
    out, inp = w.weight.shape
    cols = np.arange(inp) // w.group_size  # (in,) group of each column
    scale = w.scale[:, cols]  # (out, in)
    zero = w.zero[:, cols].astype(np.float32) if w.zero is not None else np.float32(8 if w.kind == "int4" else 0)
    if w.kind == "fp8":
        codes = (w.weight / scale).astype(ml_dtypes.float8_e4m3fn)
    else:
        codes = np.round(w.weight / scale) + zero
    back = (codes.astype(np.float32) - zero) * scale  # the artifact's dequantization formula, in float32
    stored = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}.get(w.dtype, np.float32)
    if not np.array_equal(back.astype(stored).astype(np.float32), w.weight):
        raise RuntimeError("ONNX export: a quantized weight is not on its scale grid (artifact inconsistent)")
    if w.kind == "int8":
        return codes.astype(np.int8)
    if w.kind == "int4":
        return (codes - 8).astype(ml_dtypes.int4) if w.zero is None else codes.astype(ml_dtypes.uint4)
    return codes


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _dequantize(graph: ir.Graph, old: ir.Value, layout: str, w: QuantWeight, opset: int) -> ir.Value:
    """Replace float initializer ``old`` by codes + DequantizeLinear (output keeps the old name)."""
    codes, scale, ng = weight_codes(w), w.scale.astype(np.float32), w.scale.shape[1]  # (out, in), (out, ng)
    zero = w.zero.astype(ml_dtypes.uint4) if w.zero is not None else None
    if layout == "io":
        codes, scale = codes.T, scale.T  # (in, out), (ng, out)
        zero = zero.T if zero is not None else None
    out_axis, in_axis = (0, 1) if layout == "oi" else (1, 0)
    if ng == 1:  # per output channel: 1-D scale along the output axis
        attrs, scale = {"axis": out_axis}, scale.reshape(-1)
        zero = zero.reshape(-1) if zero is not None else None
    else:
        if opset < 21:
            raise ValueError(f"grouped quantization needs opset >= 21 (got {opset})")
        attrs = {"axis": in_axis, "block_size": w.group_size}
    name = old.name
    inputs = [_initializer(graph, f"{name}.quantized", np.ascontiguousarray(codes)),
              _initializer(graph, f"{name}.scale", np.ascontiguousarray(scale))]
    if zero is not None:
        inputs.append(_initializer(graph, f"{name}.zero_point", np.ascontiguousarray(zero)))
    node = ir.node("DequantizeLinear", inputs, attrs, name=f"{name}.dequantize")
    graph.append(node)
    old.replace_all_uses_with(node.outputs[0])
    graph.initializers.pop(name)
    node.outputs[0].name = name
    return node.outputs[0]


def _const(graph: ir.Graph, name: str, array) -> ir.Value:
    if name not in graph.initializers:
        _initializer(graph, name, np.asarray(array))
    return graph.initializers[name]


def _act_qdq(graph: ir.Graph, x: ir.Value, in_features: int, input_scale: float | None, opset: int,
             tag: str) -> ir.Value:
    """Nodes that fake-quantize activation ``x`` (..., in) to int8; returns the dequantized value."""
    nodes: list[ir.Node] = []

    def op(op_type, *inputs, **attrs):
        nodes.append(ir.node(op_type, list(inputs), attrs))
        return nodes[-1].outputs[0]

    if input_scale is not None:  # static: one scale for the whole tensor, codes in [-127, 127]
        s, zp = _const(graph, f"act_scale_{tag}", np.float32(input_scale)), _const(graph, "act_zero_i8", np.int8(0))
        lo, hi = (_const(graph, f"act_{k}_{tag}", np.float32(v * input_scale)) for k, v in (("lo", -127), ("hi", 127)))
        y = op("DequantizeLinear", op("QuantizeLinear", op("Clip", x, lo, hi), s, zp), s, zp)
    else:  # dynamic per token: rows of (tokens, in), one scale each
        rows = op("Reshape", x, _const(graph, f"act_rows_{in_features}", np.array([-1, in_features], np.int64)))
        amax = op("ReduceMax", op("Abs", rows), _const(graph, "act_axis_1", np.array([1], np.int64)), keepdims=0)
        qmax, eps = _const(graph, "act_qmax", np.float32(127)), _const(graph, "act_eps", np.float32(ACT_EPS))
        s = op("Max", op("Div", amax, qmax), eps)  # (tokens,) = max(max|x| / 127, eps)
        if opset >= 21:
            q = op("QuantizeLinear", rows, s, axis=0, output_dtype=int(ir.DataType.INT8))
            dq = op("DequantizeLinear", q, s, axis=0)
        else:  # before opset 21 an int8 result needs an int8 zero point shaped like the scale
            zp = op("Cast", op("Mul", s, _const(graph, "act_zero_f", np.float32(0))), to=int(ir.DataType.INT8))
            dq = op("DequantizeLinear", op("QuantizeLinear", rows, s, zp, axis=0), s, zp, axis=0)
        y = op("Reshape", dq, op("Shape", x))
    graph.extend(nodes)
    return y


def quantize_graph(model: ir.Model, weights: dict[str, QuantWeight], opset: int) -> dict[str, dict]:
    """Rewrite ``model`` in place; returns {module: {"initializer", "layout", "kind", "act"}}."""
    graph = model.graph
    located = find_initializers(graph, weights)
    acts: dict[tuple[int, float | None], ir.Value] = {}  # one activation QDQ per (input, scale)
    report = {}
    for name, (value, layout) in located.items():
        w = weights[name]
        report[name] = {"initializer": value.name, "layout": layout, "kind": w.kind or "float", "act": w.act}
        if w.kind is None:
            continue
        dequantized = _dequantize(graph, value, layout, w, opset)
        if w.act is None:
            continue
        for node, index in list(dequantized.uses()):
            if node.op_type not in ("MatMul", "Gemm") or index != 1:
                raise RuntimeError(f"ONNX export: weight of {name} feeds {node.op_type}, not a MatMul")
            x = node.inputs[0]
            key = (id(x), w.input_scale)
            if key not in acts:
                acts[key] = _act_qdq(graph, x, w.weight.shape[1], w.input_scale, opset, str(len(acts)))
            node.replace_input_with(0, acts[key])
    graph.sort()
    return report


def targeted_bytes(model: ir.Model, report: dict[str, dict]) -> tuple[int, int]:
    """(bytes of the targeted weights' initializers incl. scales / zero points, their float32 bytes)."""
    inits, packed, fp32 = model.graph.initializers, 0, 0
    for layer in report.values():
        name = layer["initializer"]
        parts = [name] if layer["kind"] == "float" else [f"{name}.{k}" for k in ("quantized", "scale", "zero_point")]
        packed += sum(inits[p].const_value.nbytes for p in parts if p in inits)
        fp32 += 4 * inits[parts[0]].const_value.size
    return packed, fp32


def estimate_bytes(model: torch.nn.Module, weights: dict[str, QuantWeight]) -> int:
    """Bytes of a float32 export of ``model`` less what integer codes save on the quantized weights."""
    code = {"int8": 1, "fp8": 1, "int4": 0.5}
    saved = sum(w.weight.size * (4 - code[w.kind]) for w in weights.values() if w.kind)
    return int(sum(t.numel() * 4 for t in model.state_dict().values()) - saved)
