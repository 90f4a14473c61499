"""Kernel dispatch: picks the implementation of a packed linear by device, format and token count.

``SPARSIFY_KERNELS=reference|triton|auto`` (default auto) forces a path; tests use ``triton`` to
run the Triton kernels on CPU under the interpreter. On CPU, auto means the reference.
On CUDA: Triton for N:M at small token counts (memory-bound decode), torch's semi-structured
sparse matmul (cuSPARSELt / CUTLASS) for 2:4 fp16/bf16 at large token counts, otherwise the
dense weight unpacked once and cached. The token threshold below is a placeholder until
bench/kernels.py is run on a GPU (none was available when it was set): it must come from there.
"""
from __future__ import annotations

import os

import torch

from sparsify.kernels import reference

TRITON_MAX_TOKENS = 64  # crossover Triton -> semi-structured / dense; to be measured (bench/kernels.py)
_CACHE: dict[tuple, torch.Tensor] = {}  # unpacked or semi-structured weights, GPU paths only


def _triton_nm(x, fmt, tensors, attrs, bias):
    from sparsify.kernels.triton.nm_matmul import nm_linear

    return nm_linear(x, tensors["values"], tensors["meta"], attrs["n"], attrs["m"], attrs["bits"], attrs["shape"][0],
                     quant=attrs.get("quant"), scale=tensors.get("scale"), zero=tensors.get("zero"),
                     group_size=attrs.get("group_size"), bias=bias)


def _triton_w8a8(x, fmt, tensors, attrs, bias):
    from sparsify.kernels.triton.w8a8 import w8a8_linear

    return w8a8_linear(x, tensors["values"], tensors["meta"], tensors["scale"], attrs["n"], attrs["m"], attrs["bits"],
                       act_scale=tensors.get("input_scale"), bias=bias)


def _cached(key, build):
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def _dense_cached(x, fmt, tensors, attrs, bias):
    from sparsify import formats

    first = next(iter(tensors.values()))
    w = _cached(("dense", first.data_ptr(), x.dtype), lambda: formats.unpack(fmt, tensors, attrs).to(x.dtype))
    if attrs.get("activations") == "int8":
        x = reference.quantize_activations_ref(x, tensors.get("input_scale"))
    return torch.nn.functional.linear(x, w, bias)


def _semi_structured(x, fmt, tensors, attrs, bias):
    from torch.sparse import to_sparse_semi_structured

    from sparsify import formats

    w = _cached(("semi", tensors["values"].data_ptr(), x.dtype),
                lambda: to_sparse_semi_structured(formats.unpack(fmt, tensors, attrs).to(x.dtype)))
    return torch.nn.functional.linear(x, w, bias)


IMPLS = {"reference": reference.linear, "triton-nm": _triton_nm, "triton-w8a8": _triton_w8a8,
         "semi-structured": _semi_structured, "dense-cached": _dense_cached}


def kernel_name(x: torch.Tensor, fmt: str, attrs: dict) -> str:
    """Which implementation `linear` would use for this input and packed weight."""
    mode = os.environ.get("SPARSIFY_KERNELS", "auto")
    triton_ok = fmt == "nm" and attrs["m"] <= 16 and attrs.get("quant") in (None, "int8", "int4", "fp8")
    w8a8 = attrs.get("activations") == "int8"
    triton_path = "triton-w8a8" if w8a8 else "triton-nm"
    if mode == "reference" or (mode == "triton" and not triton_ok):
        return "reference"
    if mode == "triton":
        return triton_path
    if x.device.type != "cuda":
        return "reference"
    tokens = x.numel() // x.shape[-1]
    if triton_ok and tokens <= TRITON_MAX_TOKENS:
        return triton_path
    if (fmt == "nm" and (attrs["n"], attrs["m"]) == (2, 4) and not attrs.get("quant")
            and x.dtype in (torch.float16, torch.bfloat16)):
        return "semi-structured"
    return "dense-cached"


def linear(x: torch.Tensor, fmt: str, tensors: dict[str, torch.Tensor], attrs: dict,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Packed-weight linear layer: (..., in) -> (..., out)."""
    return IMPLS[kernel_name(x, fmt, attrs)](x, fmt, tensors, attrs, bias)
