"""Turn pruned dense weights into packed tensors plus their manifest entries, and sum them up.

Shared by the calibrated pipeline and the streaming bare-file path, so both write identical entries.
"""
from __future__ import annotations

import torch

from sparsify import formats
from sparsify.formats.base import nbytes


def pack_weight(module: str, weight: torch.Tensor, fmt: str, options: dict,
                layout: str = "linear") -> tuple[dict, dict]:
    """Pack one pruned (out, in) weight; returns ({key: tensor}, manifest entry).

    ``layout`` records how the source module stores it ("conv1d": transposed, see models/targets.py).
    """
    tensors, attrs = formats.pack(fmt, weight, **options)
    nnz = int(torch.count_nonzero(weight))
    entry = {
        "module": module, "format": fmt, "layout": layout, "keys": list(tensors), "shape": list(weight.shape),
        "dtype": str(weight.dtype).removeprefix("torch."), "attrs": attrs, "numel": weight.numel(), "nnz": nnz,
        "sparsity": 1 - nnz / max(1, weight.numel()), "bytes": nbytes(tensors),
        "dense_bytes": weight.numel() * weight.element_size(),
    }
    return tensors, entry


def skip_reason(weight: torch.Tensor, scheme) -> str | None:
    """Why a targeted weight cannot take the scheme (None when it can)."""
    if weight.dim() != 2:
        return f"not a matrix (shape {list(weight.shape)})"
    if scheme.kind == "nm" and weight.shape[1] % scheme.m:
        return f"in_features {weight.shape[1]} is not a multiple of {scheme.m}"
    return None


def totals(entries: dict[str, dict]) -> dict:
    numel = sum(e["numel"] for e in entries.values())
    nnz = sum(e["nnz"] for e in entries.values())
    packed = sum(e["bytes"] for e in entries.values())
    dense = sum(e["dense_bytes"] for e in entries.values())
    return {"targets": len(entries), "numel": numel, "nnz": nnz, "sparsity": 1 - nnz / numel if numel else 0.0,
            "packed_bytes": packed, "dense_bytes": dense, "ratio": packed / max(1, dense)}


class ModelPacker:
    """Adds a model's tensors to an artifact's `ShardedWriter`: each compressed weight packed in its
    plan's format (with its quantization parameters), every other tensor as it is, and a tensor that
    shares storage with one added earlier in the same call recorded in ``tied`` instead of stored twice.

    One call with the whole state dict writes an in-memory model; the streaming prune calls it once
    per block and once for the rest (storage addresses are compared within a call only, since a freed
    block's memory is reused by the next one; ties across blocks are refused before streaming).
    """

    def __init__(self, sink, active: dict, modules: dict):
        self.sink, self.active, self.modules = sink, active, modules  # module -> LayerPlan / nn.Module
        self.entries: dict[str, dict] = {}
        self.tied: dict[str, str] = {}
        self.written: set[str] = set()

    def add(self, state: dict[str, torch.Tensor], qparams: dict) -> None:
        from sparsify.formats import format_for
        from sparsify.models.targets import layout_of

        seen: dict[tuple, str] = {}
        for name, tensor in state.items():
            module = name.rpartition(".")[0]
            key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
            self.written.add(name)
            if tensor.numel() and key in seen:
                self.tied[name] = seen[key]
                continue
            seen[key] = name
            if module in self.active and name.endswith(".weight"):
                fmt, opts = format_for(self.active[module].parsed_scheme)
                if module in qparams:
                    opts = {**opts, "quant": qparams[module]}
                layout = layout_of(self.modules[module])
                weight = tensor.to("cpu").T.contiguous() if layout == "conv1d" else tensor.to("cpu")  # (out, in)
                packed, self.entries[name] = pack_weight(module, weight, fmt, opts, layout=layout)
                for k, t in packed.items():
                    self.sink.add(f"{module}.{k}", t)
            else:
                self.sink.add(name, tensor)
