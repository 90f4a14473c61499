"""Build and call the C kernels: `nm24.c` (2:4 packed weights, float32 / int8 / int4) and `bsr.c` (float32
block-sparse weights), times float32 activations, read straight from the packed layout.

The sources ship with the package and are compiled, into one library, on first use with the system C compiler (``$CC``,
else ``cc``; ``-O3 -march=native -fopenmp``) into ``$SPARSIFY_CACHE/kernels`` (default
``~/.cache/sparsify``), named by a hash of the sources, the flags and this CPU, written to a temp file
and renamed, so concurrent first uses never see half a library. About a second, once per machine.
No compiler, a failed build, or a CPU without AVX-512 (the kernel's scalar loop loses to a dense
matvec): `library()` is None, `unavailable()` says why in one line, and the dispatch runs the torch
paths instead (never an error).

The library's OpenMP resolves to the libgomp torch has already loaded (same soname), so
``torch.set_num_threads`` bounds it too; each call passes torch's thread count, or fewer for small
work (one thread per `GRAIN` multiply-adds), as torch's own parallel loops do.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("nm24.c", "bsr.c")]
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp"]
KIND_CODES = {"float": 0, "int8": 1, "int4": 2}  # the C enum
GRAIN = 1 << 16  # kept weights x tokens per thread: below it a thread costs more than it saves
_STATE: dict = {}  # "lib": CDLL | None, "why": str


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model name and feature flags (Linux), else the platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(ln for ln in lines if ln.startswith(("model name", "flags")))[:4096]
    except OSError:
        return platform.processor() + platform.machine()


def _build(target: Path, compiler: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        try:
            subprocess.run([compiler, *FLAGS, "-o", tmp, *map(str, SOURCES)], check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError:  # a compiler without OpenMP: one thread
            flags = [f for f in FLAGS if f != "-fopenmp"]
            subprocess.run([compiler, *flags, "-o", tmp, *map(str, SOURCES)], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library():
    """The loaded C library (ctypes), built on first use; None when it cannot be built here."""
    if "lib" in _STATE:
        return _STATE["lib"]
    from sparsify.models.aliases import cache_root

    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    key = hashlib.sha256(b"".join(src.read_bytes() for src in SOURCES) + " ".join(FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"nm24-{key}.so"
    lib, why = None, ""
    try:
        if not target.exists():
            if not compiler:
                raise OSError("no C compiler (set CC or install cc)")
            _build(target, compiler)
        lib = ctypes.CDLL(str(target))
        if not lib.nm24_vectorized():
            raise OSError("this CPU has no AVX-512, where the kernel's scalar loop loses to dense")
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.nm24_linear.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i32, ptr, ptr, i32]
        lib.nm24_unpack.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i32, ptr, i32]
        lib.bsr_linear.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, i32]
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", b"") or b""
        why = f"the CPU kernel is not used ({e}{': ' + err.decode(errors='replace')[:200] if err else ''})"
        lib = None
    _STATE.update(lib=lib, why=why)
    return lib


def unavailable() -> str | None:
    """None when the C kernel runs here, else the reason in one line."""
    return None if library() is not None else _STATE["why"]


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _args(tensors: dict, attrs: dict, kind: str):
    """The packed weight's pointers and shape arguments, in the C signature's order."""
    out, inp = attrs["shape"]
    scale = tensors.get("scale")
    groups = 1 if scale is None else scale.shape[1]
    return (_ptr(tensors["values"]), _ptr(tensors["meta"]), _ptr(scale), _ptr(tensors.get("zero")), out, inp,
            attrs.get("group_size") or inp, groups, KIND_CODES[kind])


def _threads(work: int) -> int:
    return max(1, min(torch.get_num_threads(), work // GRAIN))


def nm24_linear(x: torch.Tensor, tensors: dict, attrs: dict, kind: str, bias: torch.Tensor | None = None):
    """x (..., in) float32 -> (..., out) = x @ W^T (+ bias) for a 2:4 ``nm`` weight, on its packed tensors."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (tokens, in)
    y = torch.empty(x2.shape[0], attrs["shape"][0], dtype=torch.float32)  # (tokens, out)
    values, meta, scale, zero, out, inp, gs, groups, code = _args(tensors, attrs, kind)
    rc = library().nm24_linear(_ptr(x2), x2.shape[0], inp, values, meta, scale, zero, out, gs, groups, code,
                               _ptr(bias), _ptr(y), _threads(x2.shape[0] * out * inp // 2))
    if rc:
        raise ValueError(f"nm24_linear refused a weight of shape {attrs['shape']} (in must be a multiple of 4)")
    return y.view(*x.shape[:-1], out)


def nm24_unpack(tensors: dict, attrs: dict, kind: str) -> torch.Tensor:
    """The dense (out, in) float32 weight of a 2:4 ``nm`` weight (dequantized), for large token counts."""
    values, meta, scale, zero, out, inp, gs, groups, code = _args(tensors, attrs, kind)
    w = torch.empty(out, inp, dtype=torch.float32)  # (out, in)
    if library().nm24_unpack(values, meta, scale, zero, out, inp, gs, groups, code, _ptr(w), _threads(out * inp)):
        raise ValueError(f"nm24_unpack refused a weight of shape {attrs['shape']} (in must be a multiple of 4)")
    return w


def bsr_linear(x: torch.Tensor, tensors: dict, attrs: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) float32 -> (..., out) = x @ W^T (+ bias) for a float32 ``bsr`` weight, on its packed tensors."""
    (r, c), (out, inp) = attrs["block"], attrs["shape"]
    x2 = x.reshape(-1, inp).contiguous()  # (tokens, in)
    y = torch.empty(x2.shape[0], out, dtype=torch.float32)  # (tokens, out)
    values, col_idx, row_ptr = (tensors[k].contiguous() for k in ("values", "col_idx", "row_ptr"))
    if col_idx.dtype != torch.int32 or row_ptr.dtype != torch.int32:
        raise ValueError("bsr_linear takes int32 indices (fewer than 2**31 tiles)")
    bias = None if bias is None else bias.float().contiguous()
    work = values.numel() * x2.shape[0]  # kept weights x tokens
    if library().bsr_linear(_ptr(x2), x2.shape[0], inp, _ptr(values), _ptr(col_idx), _ptr(row_ptr), out, r, c,
                            _ptr(bias), _ptr(y), _threads(work)):
        raise MemoryError("bsr_linear: no memory for the transposed tiles")
    return y.view(*x.shape[:-1], out)
