"""The CPU paths of a packed linear, and the measured table that picks one per weight and token count.

Fast paths, tried in order, each up to the largest token count at which it beat ``F.linear`` on the
dense weight in bench/cpu_kernels.py (bench/results/cpu_kernels.json; 2-core AMD EPYC Zen 4, torch 2.13):
  cpu-nm24        2:4 ``nm`` weights (float32 values, int8, int4, w8a8) x float32 activations: our C kernel
                  (`nm24.c`) on the packed tensors themselves; holds nothing more.
  torch-int4pack  int4 weights, in % 32 == 0, out % 16 == 0: ``aten._weight_int4pack_mm_for_cpu`` on torch's
                  int4 layout (0.5 byte a weight + scales, cached: "int4pack" bytes).
  torch-int8pack  int8 weight-only, in % 32 == 0: ``aten._weight_int8pack_mm`` on a dense int8 copy (1 byte a
                  weight, cached: "int8pack").   Both torch kernels lose to the float32 dense weight with
                  float32 activations at every size measured, so the table only sends bfloat16 to them.
  cpu-bsr-c       float32 ``bsr`` weights (int32 indices) sparse enough, any token count: our C kernel
                  (`bsr.c`) on the packed tensors (a transposed copy of the kept tiles lives for one call).
  cpu-csr / cpu-bsr  unquantized ``bitmask`` / ``bsr`` weights sparse enough: torch's sparse matmul (CSR with
                  int32 indices, cached: "csr"; BSR straight on the packed tensors, which are its layout).
Otherwise the dense weight: cached once with ``SPARSIFY_CPU_CACHE=1`` (or ``sparsify bench --cache-dense``;
"dense" bytes, 4 bytes a float32 weight), else rebuilt for each call and dropped (no memory held; the
C kernel unpacks 2:4 weights, `sparsify.formats` the rest).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from sparsify.errors import UserError
from sparsify.kernels import reference
from sparsify.kernels.cache import cached
from sparsify.kernels.cpu import native

CACHE_ENV = "SPARSIFY_CPU_CACHE"
# (path, weight kind, activation dtype) -> most tokens at which the path beat (the dense weight, the
# per-call rebuild): the first limit applies with SPARSIFY_CPU_CACHE=1 (the alternative is the cached dense
# weight), the second without (the alternative is rebuilding it). Measured: bench/results/cpu_kernels.json.
CPU_MAX_TOKENS = {("cpu-nm24", "float", "float32"): (8, 8), ("cpu-nm24", "int8", "float32"): (16, 16),
                  ("cpu-nm24", "int4", "float32"): (16, 16), ("cpu-nm24", "w8a8", "float32"): (16, 16),  # as int8
                  ("torch-int4pack", "int4", "bfloat16"): (16, 32), ("torch-int8pack", "int8", "bfloat16"): (8, 32)}
# sparse matmul (against the dense weight): ((density at most, most tokens), ...), the first row that the
# weight's density fits decides; measured up to 128 tokens (torch's BSR matmul is slow at 3-4 tokens)
SPARSE_MAX_TOKENS = {"cpu-bsr-c": ((0.4, 1 << 62),), "cpu-csr": ((0.1, 128), (0.3, 32)),
                     "cpu-bsr": ((0.05, 128), (0.3, 2))}
FAST = ("cpu-nm24", "torch-int4pack", "torch-int8pack")
INT4_GROUPS = (256, 128, 64, 32)  # group sizes torch's int4 kernel takes


@dataclass(frozen=True)
class CpuPath:
    accepts: Callable  # (x, fmt, attrs, tensors) -> bool
    run: Callable  # (x, fmt, tensors, attrs, bias) -> y


def cache_dense() -> bool:
    """SPARSIFY_CPU_CACHE: keep a dense copy of weights that no fast path takes (1 / 0, default 0)."""
    value = os.environ.get(CACHE_ENV, "0").strip().lower()
    if value not in ("0", "1", "", "true", "false", "on", "off", "yes", "no"):
        raise UserError(f"{CACHE_ENV}={value!r}: set it to 1 (keep dense copies, faster) or 0 (default)")
    return value in ("1", "true", "on", "yes")


NM24_KINDS = ("float", "int8", "int4", "w8a8")  # fp8 codes: no CPU conversion instruction, the dense weight


def _nm24_kind(fmt: str, attrs: dict, kind: str) -> bool:
    return (fmt == "nm" and (attrs["n"], attrs["m"], attrs.get("bits", 2)) == (2, 4, 2) and kind in NM24_KINDS
            and (kind != "float" or attrs["dtype"] == "float32"))


def _nm24_accepts(x, fmt, attrs, tensors) -> bool:
    """float32 activations, a 2:4 weight whose tensors are laid out as loaded (the C code reads raw rows)."""
    return (x.dtype == torch.float32 and _nm24_kind(fmt, attrs, _kind(attrs)) and native.library() is not None
            and (tensors is None or all(t.is_contiguous() for t in tensors.values())))


def _nm24_run(x, fmt, tensors, attrs, bias):
    kind = _kind(attrs)
    if kind == "w8a8":  # int8 activations, rounded as the reference does, then the int8 weight kernel
        x, kind = reference.quantize_activations_ref(x, reference.act_scale(tensors, attrs)), "int8"
    if bias is not None and bias.dtype != torch.float32:
        return _nm24_run(x, fmt, tensors, attrs, None) + bias.float()
    if torch.compiler.is_compiling():
        from sparsify.kernels.ops import cpu_nm24_linear

        return cpu_nm24_linear(x, tensors["values"], tensors["meta"], tensors.get("scale"), tensors.get("zero"),
                               attrs["shape"][0], attrs.get("group_size") or attrs["shape"][1], kind, bias)
    return native.nm24_linear(x, tensors, attrs, kind, bias)


def _codes(fmt, tensors, attrs) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense integer codes (out, in) of a quantized weight, pruned entries at the zero point, and the
    per-column scales (out, in): exact, since W = (code - zero) * scale rounded to at most 8 bits."""
    from sparsify import formats

    out, inp = attrs["shape"]
    cols = torch.arange(inp) // attrs["group_size"]  # (in,)
    scale = tensors["scale"][:, cols]  # (out, in)
    zero = tensors["zero"][:, cols].float() if "zero" in tensors else 8.0 if attrs["quant"] == "int4" else 0.0
    codes = torch.round(formats.unpack(fmt, tensors, attrs).float() / scale) + zero  # (out, in)
    return codes, scale


def _int8pack_accepts(x, fmt, attrs, tensors) -> bool:
    """Per-channel int8 (torch's kernel takes one scale a row); in % 32 == 0 (else it reads garbage)."""
    inp = attrs["shape"][1]
    return (_kind(attrs) == "int8" and attrs["group_size"] == inp and inp % 32 == 0
            and x.dtype in (torch.float32, torch.bfloat16))


def _int8pack_run(x, fmt, tensors, attrs, bias):
    def build():
        codes, scale = _codes(fmt, tensors, attrs)
        return codes.to(torch.int8), scale[:, 0].to(x.dtype).contiguous()  # (out, in), (out,)

    codes, scale = cached(tensors["values"], ("int8pack", x.dtype), build)
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), codes, scale)  # (tokens, out)
    return _finish(y, x, bias)


def _int4_group(attrs) -> int | None:
    """torch's group size for this weight: one that divides ours (or in) and in, else None."""
    inp, gs = attrs["shape"][1], attrs["group_size"]
    return next((g for g in INT4_GROUPS if gs % g == 0 and inp % g == 0), None)


def _int4pack_accepts(x, fmt, attrs, tensors) -> bool:
    return (_kind(attrs) == "int4" and attrs["shape"][0] % 16 == 0 and _int4_group(attrs) is not None
            and x.dtype in (torch.float32, torch.bfloat16))


def _int4pack_run(x, fmt, tensors, attrs, bias):
    group = _int4_group(attrs)

    def build():  # torch dequantizes (q - 8) * s + z: our (q - zero) * s with z = (8 - zero) * s
        codes, _ = _codes(fmt, tensors, attrs)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)  # (out, in/2)
        ours = torch.arange(0, attrs["shape"][1], group) // attrs["group_size"]  # our group of each of torch's
        s = tensors["scale"][:, ours]  # (out, in/group)
        z = 8.0 - (tensors["zero"][:, ours].float() if "zero" in tensors else 8.0)
        sz = torch.stack([s, z * s], dim=-1).transpose(0, 1).to(x.dtype).contiguous()  # (in/group, out, 2)
        return packed, sz

    packed, sz = cached(tensors["values"], ("int4pack", x.dtype), build)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), packed, group, sz)  # (tokens, out)
    return _finish(y, x, bias)


def _finish(y, x, bias):
    y = y.reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias.to(y.dtype)


def density(fmt: str, attrs: dict, tensors: dict | None) -> float:
    """Kept fraction of an unquantized bitmask / bsr weight (1.0 when unknown)."""
    if tensors is None or attrs.get("quant"):
        return 1.0
    out, inp = attrs["shape"]
    return tensors["values"].numel() / max(1, out * inp) if fmt in ("bitmask", "bsr") else 1.0


def _sparse_limit(name: str, fmt: str, attrs: dict, tensors) -> int:
    d = density(fmt, attrs, tensors)
    return next((tokens for ceiling, tokens in SPARSE_MAX_TOKENS[name] if d <= ceiling), 0)


def _csr_run(x, fmt, tensors, attrs, bias):
    from sparsify import formats

    def build():
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            w = formats.unpack(fmt, tensors, attrs).to(x.dtype).to_sparse_csr()  # (out, in)
            return torch.sparse_csr_tensor(w.crow_indices().int(), w.col_indices().int(), w.values(), w.shape)

    w = cached(tensors["values"], ("csr", x.dtype), build)
    y = torch.sparse.mm(w, x.reshape(-1, x.shape[-1]).T).T  # (tokens, out)
    return _finish(y, x, bias)


def _bsr_run(x, fmt, tensors, attrs, bias):
    (r, c), (out, inp) = attrs["block"], attrs["shape"]
    values = tensors["values"]  # (nnz, R, C): torch's BSR layout, no copy
    row_ptr, br, bc = tensors["row_ptr"], tensors["row_ptr"].numel() - 1, -(-inp // c)
    w = torch.sparse_bsr_tensor(row_ptr, tensors["col_idx"].to(row_ptr.dtype), values, (br * r, bc * c))
    xp = F.pad(x.reshape(-1, inp), (0, bc * c - inp)).to(values.dtype)  # (tokens, Bc*C)
    y = (w @ xp.T).T[:, :out].to(x.dtype)  # (tokens, out)
    return _finish(y.contiguous(), x, bias)


def _bsr_c_accepts(x, fmt, attrs, tensors) -> bool:
    return (fmt == "bsr" and not attrs.get("quant") and attrs["dtype"] == "float32" and x.dtype == torch.float32
            and tensors is not None and tensors["row_ptr"].dtype == torch.int32 and native.library() is not None)


def _bsr_c_run(x, fmt, tensors, attrs, bias):
    if bias is not None and bias.dtype != torch.float32:
        return _bsr_c_run(x, fmt, tensors, attrs, None) + bias.float()
    if torch.compiler.is_compiling():
        from sparsify.kernels.ops import cpu_bsr_linear

        return cpu_bsr_linear(x, tensors["values"], tensors["col_idx"], tensors["row_ptr"], attrs["shape"][0], bias)
    return native.bsr_linear(x, tensors, attrs, bias)


def _sparse_accepts(fmt_name):
    return lambda x, fmt, attrs, tensors: (fmt == fmt_name and not attrs.get("quant")
                                           and x.dtype == getattr(torch, attrs["dtype"]))


def _kind(attrs: dict) -> str:
    return "w8a8" if attrs.get("activations") == "int8" else attrs.get("quant") or "float"


def unpacked(x, fmt, tensors, attrs) -> torch.Tensor:
    """The dense (out, in) weight in x's dtype, built for this call (C unpack for 2:4, else the formats')."""
    from sparsify import formats

    kind = "int8" if _kind(attrs) == "w8a8" else _kind(attrs)
    if _nm24_kind(fmt, attrs, kind) and native.library() is not None:
        return native.nm24_unpack(tensors, attrs, kind).to(x.dtype)
    return formats.unpack(fmt, tensors, attrs).to(x.dtype)


def _unpack_run(x, fmt, tensors, attrs, bias):
    if attrs.get("activations") == "int8":
        x = reference.quantize_activations_ref(x, reference.act_scale(tensors, attrs))
    return F.linear(x, unpacked(x, fmt, tensors, attrs), None if bias is None else bias.to(x.dtype))


PATHS = {"cpu-nm24": CpuPath(_nm24_accepts, _nm24_run),
         "torch-int4pack": CpuPath(_int4pack_accepts, _int4pack_run),
         "torch-int8pack": CpuPath(_int8pack_accepts, _int8pack_run),
         "cpu-bsr-c": CpuPath(_bsr_c_accepts, _bsr_c_run),
         "cpu-csr": CpuPath(_sparse_accepts("bitmask"), _csr_run),
         "cpu-bsr": CpuPath(_sparse_accepts("bsr"), _bsr_run),
         "cpu-unpack": CpuPath(lambda *a: True, _unpack_run)}


def choose(x, fmt: str, attrs: dict, tensors: dict | None = None) -> str:
    """The CPU path for this input and packed weight ("dense-cached" is the dispatch's own)."""
    tokens, kind, dtype = x.numel() // x.shape[-1], _kind(attrs), str(x.dtype).removeprefix("torch.")
    cache = cache_dense()
    for name in FAST:
        limit = CPU_MAX_TOKENS.get((name, kind, dtype), (0, 0))[0 if cache else 1]
        if tokens <= limit and PATHS[name].accepts(x, fmt, attrs, tensors):
            return name
    for name in ("cpu-bsr-c", "cpu-csr", "cpu-bsr"):
        if (tensors is not None and PATHS[name].accepts(x, fmt, attrs, tensors)
                and tokens <= _sparse_limit(name, fmt, attrs, tensors)):
            return name
    return "dense-cached" if cache else "cpu-unpack"
