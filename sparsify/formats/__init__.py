"""Packed weight formats: name -> `Format` in `sparsify.tables.FORMATS` (nm, bitmask, bsr, dense).

The packer -> file / kernel handoff is a flat ``dict[str, Tensor]`` plus JSON attrs.
"""
from __future__ import annotations

from sparsify.config import Scheme
from sparsify.errors import UserError
from sparsify.formats import bitmask, bsr, dense, nm  # noqa: F401  (registration)
from sparsify.formats.base import nbytes  # noqa: F401
from sparsify.formats.nm import nm_mask_ok  # noqa: F401
from sparsify.tables import FORMATS, lookup

_BY_SCHEME = {
    "nm": lambda s: ("nm", {"n": s.n, "m": s.m}),
    "unstructured": lambda s: ("bitmask", {}),
    "block": lambda s: ("bsr", {"block": list(s.block)}),
    "dense": lambda s: ("dense", {}),
}


def format_for(scheme) -> tuple[str, dict]:
    """The packed format (name, pack options) that stores a `Scheme` (or scheme string)."""
    scheme = Scheme.parse(scheme)
    if scheme.kind not in _BY_SCHEME:
        raise UserError(f"scheme {scheme} has no packed format: use unstructured, N:M (e.g. 2:4) or block:RxC")
    return _BY_SCHEME[scheme.kind](scheme)


def pack(name: str, weight, **options) -> tuple[dict, dict]:
    """Pack a dense (out, in) weight with the named format -> (tensors, attrs)."""
    return lookup(FORMATS, name, "packed format").pack(weight, **options)


def unpack(name: str, tensors: dict, attrs: dict):
    """The dense weight back from the named format's (tensors, attrs), bit-exact."""
    return lookup(FORMATS, name, "packed format").unpack(tensors, attrs)
