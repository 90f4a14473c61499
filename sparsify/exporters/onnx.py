"""Export an artifact as ONNX, checked against PyTorch with onnxruntime before it is written.

Per family, the graph takes / returns (batch and sequence axes dynamic; CLIP's two batches apart):
  causal-lm         input_ids, attention_mask[, position_ids], past_key_values.{i}.key / .value
                                                               -> logits, present.{i}.key / .value
                    (one decoding step with the KV cache, `onnx_kv`; checked by greedy generation of
                    16 tokens against PyTorch. kv_cache=False, or a cache that is not per-layer keys
                    and values: input_ids, attention_mask -> logits of whole sequences)
  encoder           input_ids, attention_mask[, token_type_ids] -> last_hidden_state
  image-classifier  pixel_values                               -> logits
  image-encoder     pixel_values                               -> last_hidden_state
  clip              input_ids, attention_mask, pixel_values    -> image_embeds, text_embeds
(encoders export their base model: a masked-LM head, unpruned, is left out, as in `eval.agreement`)
The densified float32 model is traced (dynamo exporter, TorchScript exporter as fallback), then
`onnx_quant` turns quantized weights into integer initializers + DequantizeLinear; float weights stay
dense initializers with their zeros. The file is written to a hidden temporary directory, checked with
onnxruntime against the artifact in PyTorch on a real input of other shapes than the trace saw, and
only then moved beside copies of the artifact's config / tokenizer files (`sparsify.atomic.atomic_dir`
in merge mode: a new directory appears whole, files join an existing one; nothing is left on failure).
Weights go to an external ``FILE.data`` when asked or when the model is above protobuf's 2 GB.
"""
from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from sparsify.atomic import atomic_dir
from sparsify.errors import UserError
from sparsify.exporters.artifact import copy_side_files, read_manifest
from sparsify.exporters.onnx_kv import KVWrap, experts_for_export

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

    output_axes: dict = {}  # outputs take their axes from the trace

    def run(self, inputs: dict):
        return self(**inputs)

    @staticmethod
    def export_args(inputs: dict, axes: dict, dims: dict) -> tuple[tuple, dict, dict]:
        """(positional args, keyword args, torch.export dynamic shapes): every input by keyword."""
        return (), inputs, {k: {ax: dims[d] for ax, d in axes[k].items()} for k in inputs}


def graph_io(loaded, kv_cache: bool = False) -> tuple[nn.Module, list[str], dict[str, dict[int, str]], str]:
    """(wrapper module, output names, {input: {axis: dim name}}, why a causal LM has no cache graph or "").

    ``kv_cache``: causal LMs get the one-step graph with past / present keys and values (`onnx_kv`)
    when their cache allows it.
    """
    family, model, why = loaded.family.name, loaded.model, ""
    if family == "causal-lm" and kv_cache:
        from sparsify.exporters.onnx_kv import probe_cache

        shape, why = probe_cache(model, sample_inputs(loaded, ["input_ids"]))
        if shape is not None:
            wrapper = KVWrap(model, shape).eval()
            return wrapper, wrapper.outputs, wrapper.axes, ""
    if family in ("encoder", "image-encoder"):
        model = getattr(model, "base_model", model)
    text = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    if family == "encoder" and "token_type_ids" in inspect.signature(model.forward).parameters:
        text["token_type_ids"] = {0: "batch", 1: "seq"}
    images = {"pixel_values": {0: "images"}}
    known = {"causal-lm": ("logits", ["logits"], text), "encoder": ("last_hidden_state", ["last_hidden_state"], text),
             "image-classifier": ("logits", ["logits"], images),
             "image-encoder": ("last_hidden_state", ["last_hidden_state"], images),
             "clip": ("embeds", ["image_embeds", "text_embeds"], {**text, **images})}
    if family not in known:
        raise UserError(f"ONNX export does not support the {family} family: export causal-lm, encoder, "
                        "image-classifier, image-encoder or clip models, or use --format hf-dense")
    output, outputs, axes = known[family]
    return _Wrap(model, output).eval(), outputs, axes, why


def sample_inputs(loaded, names) -> dict[str, torch.Tensor]:
    """A real input: two sentences of different length (right-padded, masked) and/or two built-in images."""
    from sparsify.calibrate.batches import normalize_images
    from sparsify.calibrate.data import load_image_text, load_images

    inputs, captions = {}, SENTENCES
    if "pixel_values" in names:
        if "input_ids" in names:
            images, captions = load_image_text("builtin", loaded.image_size, 2, seed=0)
        else:
            images, _ = load_images("builtin", loaded.image_size, 2, seed=0)
        inputs["pixel_values"] = normalize_images(images, loaded.image_mean, loaded.image_std).float()  # (2, 3, S, S)
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


def _io(wrapper, loaded, axes) -> tuple[dict, dict]:
    """(verification inputs, trace inputs): other shapes, so that baked-in sizes fail the check.

    The cache graph is traced after 3 cached tokens and checked on a prompt with none (then greedy
    decoding checks one new token after many)."""
    if isinstance(wrapper, KVWrap):
        text = sample_inputs(loaded, ["input_ids", "attention_mask"])
        return wrapper.inputs(text, past=0), wrapper.inputs(_other_shapes(text), past=3)
    inputs = sample_inputs(loaded, list(axes))
    return inputs, _other_shapes(inputs)


@torch.inference_mode()
def _reference(wrapper, inputs, outputs) -> dict[str, torch.Tensor]:
    """Outputs of the artifact itself (packed SparseLinears; w8a8 rounds activations) as float32, by name."""
    out = wrapper.run(inputs)
    return {n: o.float() for n, o in zip(outputs, out if isinstance(out, tuple) else (out,))}


def _trace(wrapper, inputs, outputs, axes, opset, tmp: Path):
    """Trace ``wrapper`` to an onnx_ir model (dynamo exporter; TorchScript exporter if that fails)."""
    import onnx_ir as ir

    dims = {name: torch.export.Dim(name) for name in {d for a in axes.values() for d in a.values()}}
    args, kwargs, dynamic = wrapper.export_args(inputs, axes, dims)
    axes = {**axes, **wrapper.output_axes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(wrapper, args, kwargs=kwargs, dynamo=True, input_names=list(inputs),
                                     output_names=outputs, opset_version=opset, dynamic_shapes=dynamic,
                                     verbose=False).model
        except Exception:  # noqa: BLE001 - some graphs only go through the TorchScript exporter
            path = tmp / "traced.onnx"
            torch.onnx.export(wrapper, args, str(path), kwargs=kwargs, dynamo=False, input_names=list(inputs),
                              output_names=outputs, opset_version=opset, dynamic_axes=axes)
            model = ir.load(path)
            path.unlink()
            return model


def _require_onnx(verify: bool) -> None:
    """One line naming the missing package, before anything is loaded (they are main dependencies; a
    broken or partial environment still gets the fix, not a traceback from a module-level import)."""
    try:
        import ml_dtypes, onnx, onnx_ir, onnxscript  # noqa: F401, E401
        if verify:
            import onnxruntime  # noqa: F401
    except ImportError as e:
        name = e.name or str(e).split("'")[1 if "'" in str(e) else 0]
        raise UserError(f"ONNX export needs {name}: pip install onnx onnx-ir onnxscript onnxruntime ml_dtypes "
                        "(or reinstall sparsify-cli)") from None


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
                tolerance: float | None = None, external_data: bool | None = None, kv_cache: bool = True) -> dict:
    """Export ``artifact_dir`` as ONNX; returns files, sizes, errors vs PyTorch and the tolerance.

    Args:
        out_file: ``.onnx`` path or a directory (default: ``ARTIFACT-onnx/model.onnx`` beside the artifact).
        opset: 18-23 (default and minimum: 21 for int4, 19 for fp8, else 18).
        tolerance: max relative error (max |onnx - torch| / max |torch|) allowed; default by dtype / quant.
        external_data: weights in ``FILE.data``; None: only when the model exceeds 2 GB.
        kv_cache: causal LMs as one decoding step with past / present keys and values (`onnx_kv`),
            checked by greedy generation of 16 tokens against PyTorch; False: logits of whole sequences.
    """
    artifact = Path(artifact_dir).resolve()
    manifest = read_manifest(artifact)
    quant = manifest.get("quant") or {}
    need = {"int4": 21, "fp8": 19}.get(quant.get("kind"), 18)
    opset = opset or need
    if opset not in OPSETS or opset < need:
        raise UserError(f"--opset {opset}: use {need}-{OPSETS[-1]}"
                        + (f" ({quant['kind']} weights need opset {need}+)" if need > 18 else ""))
    _require_onnx(verify)
    from sparsify import progress

    out = _target(artifact, out_file)
    with progress.bar("ONNX export", total=5 if verify else 4) as step, progress.quiet():
        return _export(artifact, out, opset, verify, tolerance, external_data, kv_cache, step)


def _export(artifact: Path, out: Path, opset: int, verify: bool, tolerance, external_data, kv_cache, step) -> dict:
    """`export_onnx` after its checks; ``step(n, label)`` reports progress (load, trace, quantize, save, verify)."""
    from sparsify.eval.onnx_model import compare_with
    from sparsify.exporters.onnx_quant import collect_weights, estimate_bytes, quantize_graph
    from sparsify.runtime.densify import densify
    from sparsify.runtime.load import load_artifact

    step(0, "loading the artifact" + (" and running it in PyTorch" if verify else ""))
    loaded, manifest = load_artifact(artifact)
    quant = manifest.get("quant") or {}
    wrapper, outputs, axes, no_cache = graph_io(loaded, kv_cache)
    weights = collect_weights(loaded.model, manifest)
    inputs, trace_inputs = _io(wrapper, loaded, axes)
    reference = _reference(wrapper, inputs, outputs) if verify else None
    greedy_ref = _greedy_reference(wrapper, inputs) if verify else None
    densify(loaded.model).float()
    experts_for_export(loaded.model)
    shape = getattr(wrapper, "shape", None)  # a cache graph: [kv heads, key width, value width] per layer
    cache_layers = None if shape is None else [list(x) for x in shape.layers]
    if external_data is False and (size := estimate_bytes(loaded.model, weights)) > PROTO_LIMIT:
        raise UserError(f"the model's weights take {size / 1e9:.2f} GB, above ONNX's 2 GB limit for one file: "
                        "allow external data (drop --no-external-data)")
    with atomic_dir(out.parent, merge=True) as tmp:
        step(1, "tracing the graph")
        onnx_model = _trace(wrapper, trace_inputs, outputs, axes, opset, tmp)  # an onnx_ir Model
        step(1, "storing quantized weights")
        layers = quantize_graph(onnx_model, weights, opset)
        targets = {m: [layer["initializer"], layer["layout"]] for m, layer in layers.items()}
        onnx_model.metadata_props.update({"sparsify.artifact": str(artifact), "sparsify.family": loaded.family.name,
                                          "sparsify.quant": quant.get("kind") or "none",
                                          "sparsify.targets": json.dumps(targets),
                                          "sparsify.kv_cache": json.dumps(cache_layers)})
        name, default_tol = _name_and_tolerance(manifest)
        step(1, "saving")
        result = {"onnx": str(out), "family": loaded.family.name, "opset": opset, "quant": name,
                  "inputs": list(axes), "outputs": outputs, "kv_cache": cache_layers is not None,
                  **({"kv_cache_note": f"no cache graph: {no_cache}"} if no_cache else {}),
                  **_save(onnx_model, tmp / out.name, layers, external_data)}
        if verify:  # on other shapes than the trace saw, so baked-in sizes fail here
            step(1, "checking it with onnxruntime")
            tol = default_tol if tolerance is None else tolerance
            result.update(compare_with(tmp / out.name, inputs, reference, tol))
            if greedy_ref is not None:
                result.update(_check_greedy(tmp / out.name, wrapper, greedy_ref, tol))
        else:
            result["verified"] = False
        result["side_files"] = _check_side_files(tmp, copy_side_files(artifact, tmp), out.parent)
    step(1, "done")
    return result


@torch.inference_mode()
def _greedy_reference(wrapper, inputs: dict):
    """The artifact's own greedy continuation of the first sample sentence (cache graphs only)."""
    from sparsify.exporters.onnx_kv import greedy

    if not isinstance(wrapper, KVWrap):
        return None
    prompt = inputs["input_ids"][:1, : int(inputs["attention_mask"][0].sum())]  # (1, T) unpadded
    return (*greedy(wrapper.step, prompt, wrapper.shape.empty(1)), prompt)


def _check_greedy(path: Path, wrapper, reference, tolerance: float) -> dict:
    """Greedy decoding through onnxruntime with its own cache, token for token against PyTorch."""
    from sparsify.eval.onnx_model import ort_session
    from sparsify.exporters.onnx_kv import compare_greedy, greedy, ort_step

    tokens, _ = greedy(ort_step(ort_session(path), wrapper.shape), reference[2], wrapper.shape.empty(1))
    result = compare_greedy(reference[:2], tokens, tolerance)
    if not result["greedy_match"] and not result["greedy_tie"]:
        raise UserError(f"greedy generation through onnxruntime differs from PyTorch at token "
                        f"{result['greedy_first_difference'] + 1} of {len(tokens)} (PyTorch prefers its token by "
                        f"{result['greedy_margin']:.3g}); nothing was written. Pass --no-verify to keep it anyway")
    return result


def _other_shapes(inputs: dict) -> dict:
    """Trace inputs one token shorter and with one image more than the verification inputs."""
    out = {k: v[:, :-1] for k, v in inputs.items() if k != "pixel_values"}
    if "pixel_values" in inputs:
        out["pixel_values"] = torch.cat([inputs["pixel_values"], inputs["pixel_values"][:1].flip(-1)])
    return {k: out[k] for k in inputs}


def _save(model, path: Path, layers: dict, external_data: bool | None) -> dict:
    """Write ``model`` (weights inline, or in ``path.data`` when asked or above 2 GB); sizes for the report."""
    import onnx_ir as ir

    from sparsify.exporters.onnx_quant import targeted_bytes

    total = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    external = total > PROTO_LIMIT if external_data is None else external_data
    ir.save(model, path, external_data=f"{path.name}.data" if external else None)
    files = [path] + ([path.with_name(path.name + ".data")] if external else [])
    sizes = {f.name: f.stat().st_size for f in files}
    packed, fp32 = targeted_bytes(model, layers)
    whole = sum(sizes.values())
    return {"files": [f.name for f in files], "bytes": sizes, "total_bytes": whole, "external_data": external,
            "targeted": len(layers), "targeted_bytes": packed, "targeted_fp32_bytes": fp32,
            "targeted_ratio": packed / max(fp32, 1), "fp32_dense_bytes": whole - packed + fp32,
            "size_vs_fp32": whole / max(whole - packed + fp32, 1)}


def _check_side_files(tmp: Path, side_files: list[str], folder: Path) -> list[str]:
    """Config / tokenizer copies may meet the same files in an existing ``folder``, never different ones."""
    for name in side_files:
        twin = folder / name
        if twin.exists() and twin.read_bytes() != (tmp / name).read_bytes():
            raise UserError(f"{twin} exists and differs from the artifact's: write the ONNX file to a new directory")
    return side_files


def _name_and_tolerance(manifest: dict) -> tuple[str, float]:
    """("none" | "int8" | "int4" | "fp8" | "w8a8", the default tolerance for the artifact's dtype / quant)."""
    quant, tol = manifest.get("quant") or {}, TOLERANCE.get(manifest.get("dtype", "float32"), 1e-2)
    return ("w8a8", max(tol, W8A8_TOLERANCE)) if quant.get("activations") else (quant.get("kind") or "none", tol)
