"""An exported ONNX file run through onnxruntime, usable wherever evaluation expects a torch model.

`open_onnx(path)` returns the same `LoadedModel` as `sparsify.runtime.load.open_model`, so that
``sparsify eval model.onnx`` runs the same tasks on the same data as the artifact it came from. The
config, tokenizer and processor files are read from the ONNX file's directory (the exporter copies
them there), else from the artifact recorded in the file's ``sparsify.artifact`` metadata.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from sparsify.errors import UserError

_DEFAULTS = {"attention_mask": torch.ones_like, "token_type_ids": torch.zeros_like,
             "position_ids": lambda ids: torch.arange(ids.shape[1]).expand(ids.shape[0], -1)}


def _default(name: str, kind: str, shape: list, ids: torch.Tensor):
    """A missing input for a whole-sequence run: ones / zeros / positions like ``ids``; an empty past (cache graphs)."""
    if name in _DEFAULTS:
        return _DEFAULTS[name](ids)
    if name.startswith("past_key_values.") and len(shape) == 4 and all(isinstance(d, int) for d in shape[1::2]):
        return torch.zeros(ids.shape[0], shape[1], 0, shape[3])  # (B, kv heads, 0 past tokens, width)
    return None


def ort_session(path: str | Path):
    """An onnxruntime CPU session for ``path``; a UserError naming the install command if it is missing."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install onnxruntime") from None
    if not Path(path).is_file():
        raise UserError(f"{path} does not exist: pass an .onnx file written by 'sparsify export --onnx'")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # int8 / int4 weight MatMuls (fused to MatMulNBits) compute in float32, as the artifact does;
    # onnxruntime's default (4) would also round the activations to int8.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise UserError(f"onnxruntime cannot load {path} ({str(e).splitlines()[0][:200]}): re-export it") from None


class OnnxModel(nn.Module):
    """``model(**inputs)`` -> namespace of torch tensors named like the graph outputs (``.logits``, ...).

    Inputs the graph lacks are ignored; a missing ``attention_mask`` / ``token_type_ids`` /
    ``position_ids`` defaults to ones / zeros / 0..T-1 shaped like ``input_ids``, and a cache graph's
    missing pasts to empty ones (a whole sequence from the start). Holds one empty parameter so that ``next(model.parameters())``
    (how evaluation code finds a model's device) works; outputs are always on the CPU.
    """

    def __init__(self, path: str | Path):
        super().__init__()
        self.path, self.session = str(path), ort_session(path)
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}
        self.input_shapes = {i.name: i.shape for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def _feeds(self, inputs: dict) -> dict[str, np.ndarray]:
        feeds = {}
        for name, kind in self.input_types.items():
            value = inputs.get(name)
            if value is None and "input_ids" in inputs:
                value = _default(name, kind, self.input_shapes[name], inputs["input_ids"])
            if value is None:
                raise UserError(f"the ONNX model needs input {name!r}: pass it (inputs: {', '.join(self.input_types)})")
            value = torch.as_tensor(value).detach().cpu()
            value = value.long() if "int64" in kind else value.float()
            feeds[name] = value.numpy()
        return feeds

    def weights(self) -> dict[str, torch.Tensor]:
        """The compressed Linears' weights as dense (out, in) float32, dequantized from the file, by module."""
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(self.path).graph
        inits = {i.name: i for i in graph.initializer}
        attrs = {n.output[0]: {a.name: a.i for a in n.attribute} for n in graph.node if n.op_type == "DequantizeLinear"}
        out = {}
        for module, (name, layout) in json.loads(self.metadata.get("sparsify.targets", "{}")).items():
            get = {k: numpy_helper.to_array(inits[k]).astype(np.float32) for k in
                   (name, f"{name}.quantized", f"{name}.scale", f"{name}.zero_point") if k in inits}
            if name in get:  # a float weight
                w = get[name]
            else:  # codes, scale [, zero point] of a DequantizeLinear: w = (codes - zero) * scale
                codes = get[f"{name}.quantized"]
                zero = _expand(get[f"{name}.zero_point"], codes, attrs[name]) if f"{name}.zero_point" in get else 0
                w = (codes - zero) * _expand(get[f"{name}.scale"], codes, attrs[name])
            out[module] = torch.from_numpy(np.ascontiguousarray(w if layout == "oi" else w.T))
        return out

    def forward(self, **inputs) -> SimpleNamespace:
        outputs = self.session.run(self.output_names, self._feeds(inputs))
        return SimpleNamespace(**{n: torch.from_numpy(o) for n, o in zip(self.output_names, outputs)})


def _expand(p: np.ndarray, like: np.ndarray, attrs: dict) -> np.ndarray:
    """A DequantizeLinear scale / zero point broadcast to the shape of its 2-D codes."""
    axis = attrs.get("axis", 1)
    if "block_size" in attrs:  # blockwise: repeat each block's value along the axis
        return np.repeat(p, attrs["block_size"], axis=axis)[tuple(slice(0, d) for d in like.shape)]
    return p.reshape([-1, 1] if axis == 0 else [1, -1])


def _config_dir(path: Path, model: OnnxModel) -> Path:
    for d in (path.parent, Path(model.metadata.get("sparsify.artifact", path.parent))):
        if (d / "config.json").is_file():
            return d
    raise UserError(f"no config.json beside {path.name} nor in its artifact: put the artifact's config and "
                    "tokenizer files next to the ONNX file (sparsify export --onnx does)")


def open_onnx(path: str | Path, device: str = "cpu"):
    """An ONNX file -> (LoadedModel whose ``.model`` is an `OnnxModel`, None): like `open_model`."""
    from transformers import AutoConfig

    from sparsify.models.family import family_of
    from sparsify.models.load import LoadedModel, ModelSource, preprocessing

    if device != "cpu":
        raise UserError(f"ONNX models run on the CPU through onnxruntime: drop --device {device}")
    path = Path(path)
    model = OnnxModel(path).eval()
    config_dir = _config_dir(path, model)
    config = AutoConfig.from_pretrained(config_dir)
    family = family_of(config)
    tokenizer, size, mean, std = preprocessing(config_dir, family, config)
    source = ModelSource(path=path, kind="onnx", config_dir=config_dir, weight_files=[path])
    return LoadedModel(model=model, family=family, config=config, tokenizer=tokenizer, image_size=size,
                       image_mean=mean, image_std=std, source=source, dtype=torch.float32), None


@torch.inference_mode()
def compare_with(path: str | Path, inputs: dict, reference: dict[str, torch.Tensor], tolerance: float) -> dict:
    """Run ``path`` on ``inputs`` and compare with PyTorch's ``reference`` outputs (by output name).

    Relative error = max |onnx - torch| / max |torch| over all outputs. Raises UserError above
    ``tolerance`` (or on NaN); returns the errors otherwise.
    """
    out = OnnxModel(path)(**inputs)
    abs_err = max((getattr(out, n).float() - r).abs().max().item() for n, r in reference.items())
    scale = max(r.abs().max().item() for r in reference.values())
    rel_err = abs_err / max(scale, 1e-30)
    if not rel_err <= tolerance:
        raise UserError(f"onnxruntime output differs from PyTorch: max relative error {rel_err:.3g} "
                        f"(abs {abs_err:.3g}) > tolerance {tolerance:g}; nothing was written. "
                        "Pass --tolerance to accept, or --no-verify")
    return {"max_abs_error": abs_err, "max_rel_error": rel_err, "tolerance": tolerance, "verified": True}
