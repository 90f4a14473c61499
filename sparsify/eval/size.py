"""Measured sparsity and bytes: of a loaded model's weights, and of an artifact's manifest."""
from __future__ import annotations

from pathlib import Path

import torch


def weight_sparsity(weights: dict[str, torch.Tensor]) -> dict:
    """{name: dense weight} -> per-layer and overall sparsity (fraction of exact zeros)."""
    layers = {}
    for name, w in weights.items():
        nnz = int(torch.count_nonzero(w))
        layers[name] = {"numel": w.numel(), "nnz": nnz, "sparsity": 1 - nnz / max(1, w.numel())}
    numel = sum(v["numel"] for v in layers.values())
    nnz = sum(v["nnz"] for v in layers.values())
    return {"layers": layers, "sparsity": 1 - nnz / max(1, numel), "numel": numel, "nnz": nnz}


def size_summary(manifest: dict, artifact: str | Path | None = None) -> dict:
    """Packed vs dense bytes of the compressed weights, and the artifact's bytes on disk."""
    t = manifest["totals"]
    out = {"packed_bytes": t["packed_bytes"], "dense_bytes": t["dense_bytes"], "ratio": t["ratio"],
           "manifest_sparsity": t["sparsity"]}
    if artifact is not None:
        out["disk_bytes"] = sum(f.stat().st_size for f in Path(artifact).iterdir() if f.is_file())
    return out
