"""Kernel dispatch: picks the implementation of a packed linear by device, format, quant and token count.

``SPARSIFY_KERNELS=reference|triton|auto`` (default auto) forces a path; tests use ``triton`` to run
the Triton kernels on CPU under the interpreter. Under auto, CPU goes to `sparsify.kernels.cpu.paths`
(our C kernel for 2:4 at decode sizes, torch's int4 / int8 / CSR / BSR kernels where they measured
faster, else the dense weight: cached with SPARSIFY_CPU_CACHE=1, rebuilt per call otherwise). On CUDA:
our Triton kernels for N:M weights (and ``bsr`` with 16+ power-of-two tiles) up to a token threshold
(memory-bound decode), then torch's
semi-structured sparse matmul (cuSPARSELt / CUTLASS) for 2:4 fp16/bf16, else the dense weight
unpacked once and cached. Triton paths go through the custom ops of `sparsify.kernels.ops`.
"""
from __future__ import annotations

import os

import torch

from sparsify.errors import UserError
from sparsify.kernels import reference
from sparsify.kernels.cache import _CACHE, cache_bytes, cached  # noqa: F401  (re-exported)

MODES = ("reference", "triton", "auto")
TRITON_M = (2, 4, 8, 16)  # group sizes the Triton kernels take
# Largest token count at which our Triton kernel is used on CUDA, per weight kind. UNMEASURED: these
# are placeholders (no GPU when they were set) until bench/kernel_speed.py's crossovers (the token
# count where "ours" stops beating semi-structured / dense) replace them; THRESHOLDS_MEASURED says so.
TRITON_MAX_TOKENS = {"float": 64, "int8": 256, "int4": 256, "fp8": 256, "w8a8": 4096}
THRESHOLDS_MEASURED = False
FP8_CAPABILITY = (8, 9)  # Ada / Hopper and newer: the first GPUs with fp8 conversion in hardware
TRITON_PATH = {"float": "triton-nm", "int8": "triton-nm-wq", "int4": "triton-nm-wq", "fp8": "triton-nm-wq",
               "w8a8": "triton-w8a8"}
SEMI_DTYPES = (torch.float16, torch.bfloat16)
MEMO_TOKENS = 64  # `SparseLinear` remembers its implementation for calls this small (decode sizes)


def weight_kind(attrs: dict) -> str:
    """float | int8 | int4 | fp8 | w8a8: the key of the tables above."""
    return "w8a8" if attrs.get("activations") == "int8" else attrs.get("quant") or "float"


def semi_structured_available(device: torch.device) -> bool:
    """torch's 2:4 sparse matmul needs CUDA on sm80+ (Ampere, Hopper)."""
    return (hasattr(torch.sparse, "to_sparse_semi_structured") and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 8)


def fp8_supported(device: torch.device) -> bool:
    """Triton's fp8 (e4m3) loads and conversions need compute capability 8.9+."""
    return device.type == "cuda" and tuple(torch.cuda.get_device_capability(device)) >= FP8_CAPABILITY


def _mode() -> str:
    mode = os.environ.get("SPARSIFY_KERNELS", "auto").lower()
    if mode not in MODES:
        raise UserError(f"SPARSIFY_KERNELS={mode!r}: set it to reference, triton or auto")
    return mode


def triton_path(fmt: str, attrs: dict, kind: str) -> str | None:
    """Our Triton kernel for this packed weight, or None when none takes it."""
    if fmt == "nm" and attrs.get("m") in TRITON_M and kind in TRITON_PATH:
        return TRITON_PATH[kind]
    if fmt == "bsr" and kind == "float" and all(b >= 16 and b & (b - 1) == 0 for b in attrs["block"]):
        return "triton-bsr"
    return None


def env_key() -> tuple:
    """The environment the dispatch reads: a remembered choice holds while it is unchanged."""
    return os.environ.get("SPARSIFY_KERNELS"), os.environ.get("SPARSIFY_CPU_CACHE"), os.environ.get("TRITON_INTERPRET")


def kernel_name(x: torch.Tensor, fmt: str, attrs: dict, tensors: dict | None = None) -> str:
    """Which implementation `linear` would use for this input and packed weight (``tensors``: the packed
    tensors, which the CPU's sparse paths need for the weight's density)."""
    mode, kind = _mode(), weight_kind(attrs)
    path = triton_path(fmt, attrs, kind)
    if mode == "reference" or (mode == "triton" and path is None):
        return "reference"
    if mode == "triton":
        if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError("SPARSIFY_KERNELS=triton on CPU needs TRITON_INTERPRET=1 set before sparsify is imported")
        return path
    if x.device.type == "cpu":
        from sparsify.kernels.cpu import paths

        return paths.choose(x, fmt, attrs, tensors)
    if x.device.type != "cuda":
        return "reference"
    if kind == "fp8" and not fp8_supported(x.device):
        path = None  # older GPUs: the dense weight, dequantized once, instead of a kernel that cannot run
    tokens = x.numel() // x.shape[-1]
    if path is not None and tokens <= TRITON_MAX_TOKENS[kind]:
        return path
    if (kind == "float" and fmt == "nm" and (attrs["n"], attrs["m"]) == (2, 4) and x.dtype in SEMI_DTYPES
            and semi_structured_available(x.device)):
        return "semi-structured"
    return "dense-cached"


def _dense_weight(x, fmt, tensors, attrs) -> torch.Tensor:
    from sparsify import formats

    anchor = tensors["values"] if "values" in tensors else next(iter(tensors.values()))
    return cached(anchor, ("dense", x.dtype), lambda: formats.unpack(fmt, tensors, attrs).to(x.dtype))  # (out, in)


def _dense_cached(x, fmt, tensors, attrs, bias):
    if attrs.get("activations") == "int8":
        x = reference.quantize_activations_ref(x, reference.act_scale(tensors, attrs))
    return torch.nn.functional.linear(x, _dense_weight(x, fmt, tensors, attrs), bias)


def _semi_structured(x, fmt, tensors, attrs, bias):
    from sparsify import formats

    def build():  # from a transient dense copy, never the cached one: only the compressed weight stays
        try:
            return torch.sparse.to_sparse_semi_structured(formats.unpack(fmt, tensors, attrs).to(x.dtype))
        except (RuntimeError, ValueError):  # shape / dtype cuSPARSELt refuses: the dense weight instead
            return None

    w = cached(tensors["values"], ("semi", x.dtype), build)
    if w is None:
        return _dense_cached(x, fmt, tensors, attrs, bias)
    y = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), w, bias)  # (tokens, out)
    return y.view(*x.shape[:-1], -1)


def _triton_nm(x, fmt, tensors, attrs, bias):
    from sparsify.kernels import ops

    return ops.nm_linear(x, tensors["values"], tensors["meta"], attrs["n"], attrs["m"], bias)


def _triton_wq(x, fmt, tensors, attrs, bias):
    from sparsify.kernels import ops

    return ops.nm_linear_wq(x, tensors["values"], tensors["meta"], tensors["scale"], tensors.get("zero"),
                            attrs["n"], attrs["m"], attrs["quant"], attrs["group_size"], bias)


def _triton_w8a8(x, fmt, tensors, attrs, bias):
    from sparsify.kernels import ops

    static = reference.act_scale(tensors, attrs)
    return ops.w8a8_linear(x, tensors["values"], tensors["meta"], tensors["scale"], attrs["n"], attrs["m"],
                           None if static is None else static.to(x.device), bias)


def _triton_bsr(x, fmt, tensors, attrs, bias):
    from sparsify.kernels import ops

    return ops.bsr_linear(x, tensors["values"], tensors["col_idx"], tensors["row_ptr"], attrs["shape"][0], bias)


IMPLS = {"reference": reference.linear, "triton-nm": _triton_nm, "triton-nm-wq": _triton_wq,
         "triton-w8a8": _triton_w8a8, "triton-bsr": _triton_bsr, "semi-structured": _semi_structured,
         "dense-cached": _dense_cached}


def _register_cpu_paths() -> None:
    from sparsify.kernels.cpu.paths import PATHS

    IMPLS.update({name: path.run for name, path in PATHS.items()})


_register_cpu_paths()


def linear(x: torch.Tensor, fmt: str, tensors: dict[str, torch.Tensor], attrs: dict,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Packed-weight linear layer: x (..., in) -> (..., out) = x @ W^T (+ bias)."""
    return IMPLS[kernel_name(x, fmt, attrs, tensors)](x, fmt, tensors, attrs, bias)
