"""Export an artifact as ONNX, checked against PyTorch with onnxruntime before it is written.

Per family, the graph takes / returns (batch and sequence axes dynamic; CLIP's two batches apart):
  causal-lm         input_ids, attention_mask                  -> logits
  encoder           input_ids, attention_mask[, token_type_ids] -> last_hidden_state
  image-classifier  pixel_values                               -> logits
  clip              input_ids, attention_mask, pixel_values    -> image_embeds, text_embeds
The densified float32 model is traced with the dynamo exporter (TorchScript exporter as fallback),
then `onnx_quant` turns quantized weights into integer initializers + DequantizeLinear; float
weights stay dense initializers with their zeros. The file is written to a hidden temporary
directory, run with onnxruntime on a real input and compared with the artifact in PyTorch, and only
then moved into place beside copies of the artifact's config / tokenizer files (nothing is left
behind on failure). Weights go to an external ``.data`` file when the model is above 2 GB.
"""
from __future__ import annotations

import inspect
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from sparsify.errors import UserError
from sparsify.exporters.artifact import copy_side_files, read_manifest

OPSETS = range(18, 24)
PROTO_LIMIT = 2_000_000_000  # bytes: protobuf's hard limit for one file
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}  # max |onnx - torch| / max |torch|
W8A8_TOLERANCE = 2e-2  # per-token rounding can flip a code where ORT and torch differ by an ulp
SENTENCES = ["The quick brown fox jumps over the lazy dog near the river bank at dawn.", "Sparse weights."]


class _Wrap(nn.Module):
    """The model as a graph of plain tensors: text -> ``output``; images (and text, CLIP) -> logits / embeddings."""

    def __init__(self, model, output: str):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None):
        kw = {k: v for k, v in [("input_ids", input_ids), ("attention_mask", attention_mask),
                                ("token_type_ids", token_type_ids), ("pixel_values", pixel_values)] if v is not None}
        out = self.model(**kw, **({"use_cache": False} if self.output == "logits" and input_ids is not None else {}))
        return (out.image_embeds, out.text_embeds) if self.output == "embeds" else getattr(out, self.output)


def graph_io(loaded) -> tuple[nn.Module, list[str], dict[str, dict[int, str]]]:
    """(wrapper module, output names, {input: {axis: dim name}}) for a loaded model's family."""
    family, model = loaded.family.name, loaded.model
    text = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    if family == "encoder" and "token_type_ids" in inspect.signature(model.forward).parameters:
        text["token_type_ids"] = {0: "batch", 1: "seq"}
    images = {"pixel_values": {0: "images"}}
    known = {"causal-lm": ("logits", ["logits"], text), "encoder": ("last_hidden_state", ["last_hidden_state"], text),
             "image-classifier": ("logits", ["logits"], images),
             "clip": ("embeds", ["image_embeds", "text_embeds"], {**text, **images})}
    if family not in known:
        raise UserError(f"ONNX export does not support the {family} family: export causal-lm, encoder, "
                        "image-classifier or clip models, or use --format hf-dense")
    output, outputs, axes = known[family]
    return _Wrap(model, output).eval(), outputs, axes


def sample_inputs(loaded, names) -> dict[str, torch.Tensor]:
    """A real input: two sentences of different length (right-padded, masked) and/or two built-in images."""
    from sparsify.calibrate.batches import _normalize
    from sparsify.calibrate.data import load_image_text, load_images

    inputs, captions = {}, SENTENCES
    if "pixel_values" in names:
        if "input_ids" in names:
            images, captions = load_image_text("builtin", loaded.image_size, 2, seed=0)
        else:
            images, _ = load_images("builtin", loaded.image_size, 2, seed=0)
        inputs["pixel_values"] = _normalize(images, loaded.image_mean, loaded.image_std).float()  # (2, 3, S, S)
    if "input_ids" in names:
        config = getattr(loaded.config, "text_config", None) or loaded.config
        limit = min(32, getattr(config, "max_position_embeddings", 32))
        rows = [loaded.tokenizer(c)["input_ids"][:limit] for c in captions]
        length = max(map(len, rows))
        pad = loaded.tokenizer.pad_token_id or 0
        inputs["input_ids"] = torch.tensor([r + [pad] * (length - len(r)) for r in rows])  # (2, T)
        inputs["attention_mask"] = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    if "token_type_ids" in names:
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    return {k: inputs[k] for k in names}


@torch.inference_mode()
def _reference(loaded, wrapper, inputs, outputs, weights) -> dict[str, torch.Tensor]:
    """Outputs of the artifact itself (packed SparseLinears) in PyTorch, as float32, by output name."""
    from sparsify.exporters.onnx_quant import act_fake_quant

    hooks = [loaded.model.get_submodule(name).register_forward_pre_hook(
        lambda m, args, s=w.input_scale: (act_fake_quant(args[0], s),)) for name, w in weights.items() if w.act]
    try:
        out = wrapper(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return {n: o.float() for n, o in zip(outputs, out if isinstance(out, tuple) else (out,))}


def _trace(wrapper, inputs, outputs, axes, opset, tmp: Path):
    """Trace ``wrapper`` to an onnx_ir model (dynamo exporter; TorchScript exporter if that fails)."""
    import onnx_ir as ir

    dims = {name: torch.export.Dim(name) for name in {d for a in axes.values() for d in a.values()}}
    dynamic = {k: {ax: dims[d] for ax, d in axes[k].items()} for k in inputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(wrapper, (), kwargs=inputs, dynamo=True, input_names=list(inputs),
                                     output_names=outputs, opset_version=opset, dynamic_shapes=dynamic,
                                     verbose=False).model
        except Exception:  # noqa: BLE001 - some graphs only go through the TorchScript exporter
            path = tmp / "traced.onnx"
            torch.onnx.export(wrapper, (), str(path), kwargs=inputs, dynamo=False, input_names=list(inputs),
                              output_names=outputs, opset_version=opset, dynamic_axes=axes)
            model = ir.load(path)
            path.unlink()
            return model


def _require_onnx(verify: bool) -> None:
    try:
        import onnx_ir  # noqa: F401
        import onnxscript  # noqa: F401
        if verify:
            import onnxruntime  # noqa: F401
    except ImportError as e:
        raise UserError(f"ONNX export needs {e.name}: pip install onnx onnxscript onnxruntime") from None


def _target(artifact: Path, out_file) -> Path:
    """Where model.onnx goes: -o FILE.onnx, -o DIR (DIR/model.onnx), default ARTIFACT-onnx/model.onnx."""
    out = Path(out_file) if out_file else artifact.parent / f"{artifact.name}-onnx"
    out = (out if out.suffix == ".onnx" else out / "model.onnx").resolve()
    if out.exists() or out.with_name(out.name + ".data").exists():
        raise UserError(f"{out} already exists: choose another -o file")
    if not out.parent.parent.exists():
        raise UserError(f"directory {out.parent.parent} does not exist: create it first")
    return out


def export_onnx(artifact_dir, out_file=None, *, opset: int | None = None, verify: bool = True,
                tolerance: float | None = None, external_data: bool | None = None) -> dict:
    """Export ``artifact_dir`` as ONNX; returns files, sizes, errors vs PyTorch and the tolerance.

    Args:
        out_file: ``.onnx`` path or a directory (default: ``ARTIFACT-onnx/model.onnx`` beside the artifact).
        opset: 18-23 (default 21 for int4, 19 for fp8, else 18).
        tolerance: max relative error (max |onnx - torch| / max |torch|) allowed; default by dtype / quant.
        external_data: weights in ``FILE.data``; None: only when the model exceeds 2 GB.
    """
    from sparsify.eval.onnx_model import compare_with
    from sparsify.exporters.onnx_quant import collect_weights, quantize_graph

    artifact = Path(artifact_dir).resolve()
    manifest = read_manifest(artifact)
    quant = manifest.get("quant") or {}
    opset = opset or {"int4": 21, "fp8": 19}.get(quant.get("kind"), 18)
    need = {"int4": 21, "fp8": 19}.get(quant.get("kind"), 18)
    if opset not in OPSETS or opset < need:
        raise UserError(f"--opset {opset}: use {max(need, OPSETS[0])}-{OPSETS[-1]}"
                        + (f" ({quant['kind']} weights need opset {need}+)" if need > 18 else ""))
    _require_onnx(verify)
    out = _target(artifact, out_file)
    from sparsify.runtime.densify import densify
    from sparsify.runtime.load import load_artifact

    loaded, manifest = load_artifact(artifact)
    wrapper, outputs, axes = graph_io(loaded)
    weights = collect_weights(loaded.model, manifest)
    inputs = sample_inputs(loaded, list(axes))
    reference = _reference(loaded, wrapper, inputs, outputs, weights) if verify else None
    densify(loaded.model).float()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent if out.parent.exists() else out.parent.parent))
    try:
        onnx_model = _trace(wrapper, inputs, outputs, axes, opset, tmp)  # an onnx_ir Model
        layers = quantize_graph(onnx_model, weights, opset)
        onnx_model.metadata_props.update({"sparsify.artifact": str(artifact), "sparsify.family": loaded.family.name,
                                     "sparsify.quant": quant.get("kind") or "none"})
        result = {"onnx": str(out), "family": loaded.family.name, "opset": opset, "quant": _quant_name(quant),
                  "inputs": list(axes), "outputs": outputs, **_save(onnx_model, tmp / out.name, layers, external_data)}
        if verify:
            tol = tolerance if tolerance is not None else _default_tolerance(manifest, quant)
            result.update(compare_with(tmp / out.name, inputs, reference, tol))
        else:
            result["verified"] = False
        result["side_files"] = _place(tmp, copy_side_files(artifact, tmp), out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _save(model, path: Path, layers: dict, external_data: bool | None) -> dict:
    """Write ``model`` (weights inline, or in ``path.data`` when asked or above 2 GB); sizes for the report."""
    import onnx_ir as ir

    inits = model.graph.initializers
    total = sum(v.const_value.nbytes for v in inits.values())
    if external_data is False and total > PROTO_LIMIT:
        raise UserError(f"the model's weights take {total / 1e9:.2f} GB, above ONNX's 2 GB limit for one file: "
                        "allow external data (drop --no-external-data)")
    external = total > PROTO_LIMIT if external_data is None else external_data
    ir.save(model, path, external_data=f"{path.name}.data" if external else None)
    files = [path] + ([path.with_name(path.name + ".data")] if external else [])
    sizes = {f.name: f.stat().st_size for f in files}
    packed = fp32 = 0
    for layer in layers.values():
        name = layer["initializer"]
        parts = [name] if layer["kind"] == "float" else [f"{name}.{k}" for k in ("quantized", "scale", "zero_point")]
        packed += sum(inits[p].const_value.nbytes for p in parts if p in inits)
        fp32 += 4 * inits[parts[0]].const_value.size
    whole = sum(sizes.values())
    return {"files": [f.name for f in files], "bytes": sizes, "total_bytes": whole, "external_data": external,
            "targeted": len(layers), "targeted_bytes": packed, "targeted_fp32_bytes": fp32,
            "targeted_ratio": packed / max(fp32, 1), "fp32_dense_bytes": whole - packed + fp32,
            "size_vs_fp32": whole / max(whole - packed + fp32, 1)}


def _place(tmp: Path, side_files: list[str], out: Path) -> list[str]:
    """Move the finished files from ``tmp`` to ``out``'s directory (a new directory appears whole)."""
    if not out.parent.exists():
        tmp.rename(out.parent)
        return side_files
    for name in side_files:  # config / tokenizer copies may meet the same files, never different ones
        twin = out.parent / name
        if twin.exists() and twin.read_bytes() != (tmp / name).read_bytes():
            raise UserError(f"{twin} exists and differs from the artifact's: write the ONNX file to a new directory")
    for f in tmp.iterdir():
        if not (out.parent / f.name).exists():
            f.replace(out.parent / f.name)
    return side_files


def _quant_name(quant: dict) -> str:
    return "w8a8" if quant.get("activations") else (quant.get("kind") or "none")


def _default_tolerance(manifest: dict, quant: dict) -> float:
    tol = TOLERANCE.get(manifest.get("dtype", "float32"), 1e-2)
    return max(tol, W8A8_TOLERANCE) if quant.get("activations") else tol
