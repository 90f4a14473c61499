"""Load an artifact back into a runnable model, or open any model argument for evaluation.

The model is rebuilt from the copied config with parameters on the meta device, each compressed
Linear or transformers ``Conv1D`` is swapped for a `SparseLinear` holding its packed tensors (always
of the (out, in) weight, so one ``x W^T + b`` serves both; a Conv1D's bias is (out,) like a Linear's),
and every other tensor is
loaded with ``assign=True`` (no second allocation). An artifact whose manifest has an "attention"
section (Double Sparsity) gets its sparse attention installed (`sparsify.attention.ds_runtime`), so
``generate()`` and every evaluation run with it. Only allow-listed format names and only
safetensors are read.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sparsify import registry
from sparsify.errors import UserError
from sparsify.exporters.artifact import MANIFEST_NAME, read_manifest
from sparsify.exporters.safetensors_io import read_tensors
from sparsify.runtime.meta import build_on_meta, check_loaded
from sparsify.runtime.sparse_linear import SparseLinear


def _build_skeleton(path: Path, manifest: dict):
    from transformers import AutoConfig

    from sparsify.models.family import family_of

    config = AutoConfig.from_pretrained(path)
    family = family_of(config)
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    return build_on_meta(config, family.auto_class, dtype), family, config, dtype


def load_artifact(path: str | Path, device: str = "cpu", max_memory: str | None = None, forward_tokens: int = 2048):
    """Rebuild an artifact as a `LoadedModel` whose compressed Linears are `SparseLinear`.

    ``max_memory`` (e.g. "4GB"): hold at most that much; what does not fit is offloaded to disk and read
    before each forward by accelerate (`sparsify.runtime.offload`; CPU only), keeping room for the
    activations of ``forward_tokens`` tokens at a time.
    """
    from sparsify.models.load import LoadedModel, ModelSource, check_device, preprocessing

    path = Path(path)
    check_device(device)
    manifest = read_manifest(path)
    if not (path / "config.json").exists():
        raise UserError(f"{path} holds pruned bare weights (no config.json), which cannot run: "
                        "use 'sparsify info' for its sizes, or prune the model directory instead")
    if max_memory is not None and (device != "cpu" or manifest.get("attention")):
        raise UserError("--max-memory offloads to disk on CPU only, without Double Sparsity attention: "
                        "drop --max-memory, or use --device cpu")
    registry.load_all()
    model, family, config, dtype = _build_skeleton(path, manifest)
    if max_memory is None:
        tensors, where = read_tensors(path), None
    else:
        from sparsify.runtime.offload import header_tensors

        tensors, where = header_tensors(path)
    from sparsify.attention.artifact import install_from_manifest, take_calibration

    attention = take_calibration(manifest, tensors)  # Double Sparsity's rankings / ranges are no model tensors
    for name, entry in manifest["tensors"].items():
        if entry["format"] not in registry.FORMATS:
            raise UserError(f"{name}: unknown packed format {entry['format']!r}: upgrade sparsify")
        module = entry["module"]
        packed = {k: tensors.pop(f"{module}.{k}") for k in entry["keys"]}
        bias = tensors.pop(f"{module}.bias", None)
        model.set_submodule(module, SparseLinear(entry["format"], entry["attrs"], packed, bias))
    model.load_state_dict(tensors, strict=False, assign=True)
    for name, other in manifest.get("tied", {}).items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(other))
    if where is not None:
        from sparsify.config import parse_size
        from sparsify.runtime.offload import dispatch

        missing = [n for n, _ in model.named_parameters() if n not in where and n not in manifest.get("tied", {})]
        if missing:
            raise UserError(f"{path} is incomplete ({missing[0]} is not in its files): re-run 'sparsify prune'")
        dispatch(model.eval(), where, parse_size(max_memory), forward_tokens)
    else:
        try:
            check_loaded(model)
        except ValueError as e:
            raise UserError(f"{path} is incomplete ({e}): re-run 'sparsify prune'") from None
        model.eval().to(device)
    if attention is not None:
        install_from_manifest(model, manifest, attention)
    source = ModelSource(path=path, kind="hf-dir", config_dir=path, weight_files=[], alias=None)
    tokenizer, size, mean, std = preprocessing(path, family, config)
    return LoadedModel(model=model, family=family, config=config, tokenizer=tokenizer, image_size=size,
                       image_mean=mean, image_std=std, source=source, dtype=dtype), manifest


def is_artifact(arg: str | Path) -> bool:
    return (Path(arg) / MANIFEST_NAME).is_file()


def open_model(arg: str, dtype: str | None = None, device: str = "cpu", cache_dir: str | None = None,
               max_memory: str | None = None, forward_tokens: int = 2048):
    """An artifact directory or any model argument (path or alias) -> (LoadedModel, manifest or None)."""
    if is_artifact(arg):
        return load_artifact(arg, device=device, max_memory=max_memory, forward_tokens=forward_tokens)
    if max_memory is not None:
        raise UserError(f"--max-memory offloads sparsify artifacts; {arg} is not one: prune it first (with "
                        "--max-memory), or drop --max-memory")
    if str(arg).endswith(".onnx"):
        from sparsify.eval.onnx_model import open_onnx

        return open_onnx(arg, device=device)
    from sparsify.models.load import load_model, resolve

    source = resolve(arg, cache_dir=cache_dir)
    if source.kind != "hf-dir":
        raise UserError(f"{arg} is a bare safetensors file without config.json: it cannot run; pass a model directory")
    return load_model(source, dtype=dtype, device=device), None
