"""Export an artifact as a plain Hugging Face model directory (``--format hf-dense``).

Every packed weight is unpacked to a dense tensor in the artifact's dtype: pruned weights are exact
zeros and quantized weights are dequantized with the artifact's own formula, so transformers alone
(no sparsify) loads the directory and computes what the artifact computes. Each weight is written in
its source module's layout (``layout`` in the manifest: a GPT-2 ``Conv1D`` stores (in, out)). The config, generation
config and tokenizer / processor files are copied; ``sparsify.json`` is not (the output is not an
artifact). Written to a hidden temporary directory and renamed into place when complete.
"""
from __future__ import annotations

from pathlib import Path

from sparsify.atomic import atomic_dir
from sparsify.errors import UserError
from sparsify.exporters.artifact import copy_side_files, read_manifest


def _check_out(out: Path, artifact: Path) -> Path:
    out = out.resolve()
    if out.exists():
        raise UserError(f"{out} already exists: choose a new -o directory for the hf-dense export")
    if out.is_relative_to(artifact) or artifact.is_relative_to(out):
        raise UserError(f"{out} overlaps the artifact {artifact}: choose a -o directory outside it")
    if not out.parent.exists():
        raise UserError(f"parent directory {out.parent} does not exist: create it first")
    return out


def _restore_conv1d(model, manifest: dict) -> None:
    """Turn each densified target whose source was a transformers ``Conv1D`` (GPT-2) back into one, its
    weight in the stored (in, out) layout, so the directory holds the source's shapes and loads as it did."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from sparsify.models.targets import to_stored

    for entry in manifest["tensors"].values():
        if entry.get("layout", "linear") != "conv1d":
            continue
        lin = model.get_submodule(entry["module"])  # the densified nn.Linear, weight (out, in)
        conv = Conv1D(lin.out_features, lin.in_features)
        conv.weight = torch.nn.Parameter(to_stored(lin.weight.detach(), "conv1d"), requires_grad=False)  # (in, out)
        bias = lin.bias if lin.bias is not None else torch.zeros(lin.out_features, dtype=lin.weight.dtype)
        conv.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)  # (out,)
        model.set_submodule(entry["module"], conv)


def export_hf_dense(artifact_dir, out_dir) -> dict:
    """Write ``out_dir``: config + tokenizer files + dense ``model.safetensors`` (zeros kept, dequantized).

    Returns {"output", "files", "bytes", "total_bytes", "dtype", "dense_layers", "dequantized", "sparsity"}.
    """
    import torch
    from transformers.utils import logging

    from sparsify.runtime.densify import densify, sparse_modules
    from sparsify.runtime.load import load_artifact

    artifact = Path(artifact_dir).resolve()
    read_manifest(artifact)
    out = _check_out(Path(out_dir), artifact)
    loaded, manifest = load_artifact(artifact)
    layers = sparse_modules(loaded.model)
    quantized = sorted(name for name, m in layers.items() if m.attrs.get("quant"))
    densify(loaded.model)
    zeros = sum(int((loaded.model.get_submodule(n).weight == 0).sum()) for n in layers)
    numel = sum(loaded.model.get_submodule(n).weight.numel() for n in layers)
    _restore_conv1d(loaded.model, manifest)
    logging.disable_progress_bar()
    with atomic_dir(out) as tmp:
        copy_side_files(artifact, tmp)
        with torch.no_grad():
            loaded.model.save_pretrained(tmp, safe_serialization=True)
    sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    return {"output": str(out), "files": list(sizes), "bytes": sizes, "total_bytes": sum(sizes.values()),
            "dtype": str(loaded.dtype).removeprefix("torch."), "dense_layers": len(layers),
            "dequantized": len(quantized), "sparsity": zeros / max(numel, 1)}
