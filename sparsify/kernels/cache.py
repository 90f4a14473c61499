"""What the dispatch builds once per packed weight and keeps beside it: a dense copy, a semi-structured
weight (CUDA), torch's int8 / int4 packed weights or a CSR copy (CPU). Keyed by the packed tensor's id
and in-place version; an entry is dropped when that tensor is freed. `cache_bytes` states the memory.
"""
from __future__ import annotations

import weakref

import torch

_CACHE: dict[tuple, object] = {}  # (id, version, tag) of a packed tensor -> what was built from it


def cached(anchor: torch.Tensor, tag: tuple, build):
    """build() once per packed tensor (and in-place version); dropped when the tensor is freed."""
    key = (id(anchor), anchor._version, tag)
    if key not in _CACHE:
        _CACHE[key] = build()
        weakref.finalize(anchor, _CACHE.pop, key, None)
    return _CACHE[key]


def nbytes(obj) -> int:
    """Bytes held by a cached object: a tensor (strided or sparse compressed), a tuple of them, or
    torch's semi-structured weight (its ``packed`` and ``meta`` tensors)."""
    if obj is None or isinstance(obj, (int, float, str)):
        return 0
    if isinstance(obj, (tuple, list)):
        return sum(nbytes(o) for o in obj)
    if isinstance(obj, torch.Tensor):
        if obj.layout == torch.strided:
            return obj.numel() * obj.element_size()
        if obj.layout in (torch.sparse_csr, torch.sparse_bsr):
            return nbytes((obj.crow_indices(), obj.col_indices(), obj.values()))
    return sum(nbytes(t) for t in (getattr(obj, a, None) for a in ("packed", "meta")) if isinstance(t, torch.Tensor))


def cache_bytes() -> dict[str, int]:
    """Bytes the dispatch holds beside the packed weights, by kind ("dense", "semi", "int8pack",
    "int4pack", "csr"): what a dense-cached path, a semi-structured weight or torch's own packed
    layouts cost on top of the artifact's tensors."""
    out: dict[str, int] = {}
    for (_, _, tag), w in list(_CACHE.items()):
        if w is not None:
            out[tag[0]] = out.get(tag[0], 0) + nbytes(w)
    return out
