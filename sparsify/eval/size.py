"""Measured sparsity and bytes: of a loaded model's weights, and of an artifact's manifest.

`weight_sparsity` counts exact zeros in the weights as they are in memory (for a packed module,
after unpacking), so it checks what the manifest claims instead of repeating it. `size_summary`
reads the manifest: packed vs dense bytes of the compressed tensors and the artifact's files.
"""
from __future__ import annotations

import torch


def _dense_weight(module) -> torch.Tensor:
    """The (out, in) weight of a Linear, or of a packed module through its ``dense_weight()``."""
    unpack = getattr(module, "dense_weight", None)
    return unpack() if callable(unpack) else module.weight.detach()


@torch.no_grad()
def tensor_stats(weights: dict[str, torch.Tensor]) -> dict[str, dict]:
    """{name: tensor} -> {name: {"numel", "nnz", "sparsity"}} (sparsity = fraction of exact zeros)."""
    out = {}
    for name, w in weights.items():
        numel, nnz = w.numel(), int(torch.count_nonzero(w))
        out[name] = {"numel": numel, "nnz": nnz, "sparsity": 1 - nnz / max(1, numel)}
    return out


def weight_sparsity(model: torch.nn.Module, names: list[str]) -> dict[str, dict]:
    """Per-layer sparsity of the modules ``names`` of ``model`` (Linear or packed), in the given order;
    a module offloaded to disk (`sparsify.runtime.offload`) is read in for its count, then dropped.

    Returns:
        {name: {"numel", "nnz", "sparsity"}}.
    """
    from accelerate.utils import align_module_device  # accelerate's own onload of an offloaded module

    from sparsify.resources import trim_freed_memory

    out = {}
    for name in names:
        module = model.get_submodule(name)
        with align_module_device(module):
            out.update(tensor_stats({name: _dense_weight(module)}))
        if getattr(module, "_hf_hook", None) is not None:
            trim_freed_memory()  # offloaded: hand the layer's memory back before the next one
    return out


def overall(layers: dict[str, dict]) -> dict:
    """Totals over per-layer stats: {"count", "numel", "nnz", "sparsity"} (sparsity weighted by numel)."""
    numel = sum(v["numel"] for v in layers.values())
    nnz = sum(v["nnz"] for v in layers.values())
    return {"count": len(layers), "numel": numel, "nnz": nnz, "sparsity": 1 - nnz / numel if numel else 0.0}


def format_label(entry: dict) -> str:
    """``nm 2:4 int8``, ``bitmask int4/g128``, ``dense``: the packed format with its key attributes."""
    a = entry.get("attrs", {})
    label = entry["format"]
    if "n" in a and "m" in a:
        label += f" {a['n']}:{a['m']}"
    if a.get("block"):
        label += " " + "x".join(map(str, a["block"]))
    if a.get("quant"):
        label += f" {a['quant']}"
        if a.get("group_size") and a["group_size"] < entry["shape"][-1]:
            label += f"/g{a['group_size']}"
    return label


def size_summary(manifest: dict) -> dict:
    """Bytes of an artifact from its manifest (schema in sparsify.exporters.artifact).

    Returns:
        {"layers": {tensor: {"sparsity", "format", "packed_bytes", "dense_bytes", "ratio"}} in model order,
         "targets", "sparsity", "packed_bytes", "dense_bytes", "ratio" (packed / dense),
         "disk_bytes" (the artifact's weight files), "dense_disk_bytes" (the same files with every
         compressed tensor stored dense instead), "disk_ratio", "skipped" (count)}; the disk fields
         are None when the manifest records no files.
    """
    layers = {name: {"sparsity": e["sparsity"], "format": format_label(e), "packed_bytes": e["bytes"],
                     "dense_bytes": e["dense_bytes"], "ratio": e["bytes"] / max(1, e["dense_bytes"])}
              for name, e in manifest["tensors"].items()}
    packed = sum(v["packed_bytes"] for v in layers.values())
    dense = sum(v["dense_bytes"] for v in layers.values())
    numel = sum(e["numel"] for e in manifest["tensors"].values())
    nnz = sum(e["nnz"] for e in manifest["tensors"].values())
    files = manifest.get("files") or {}
    disk = sum(files.values()) if files else None
    dense_disk = None if disk is None else disk - packed + dense
    disk_ratio = None if disk is None else disk / max(1, dense_disk)
    return {"layers": layers, "targets": len(layers), "sparsity": 1 - nnz / numel if numel else 0.0,
            "packed_bytes": packed, "dense_bytes": dense, "ratio": packed / max(1, dense), "disk_bytes": disk,
            "dense_disk_bytes": dense_disk, "disk_ratio": disk_ratio, "skipped": len(manifest.get("skipped", {}))}
