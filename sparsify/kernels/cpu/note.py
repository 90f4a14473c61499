"""The one-line CPU note of `sparsify eval` and `sparsify bench`: which packed layers of a model have no
fast CPU path at decode (`sparsify.kernels.cpu.paths`) and so rebuild their dense weight on every call.
"""
from __future__ import annotations

import torch

from sparsify import kernels

CPU_NOTE = ("{slow} of {total} packed layers have no fast CPU kernel at decode ({formats}) and rebuild their "
            "dense weight on every call, slower than dense: set SPARSIFY_CPU_CACHE=1 (or 'sparsify bench "
            "--cache-dense') to keep dense copies ({mb:.0f} MB), or export ('sparsify export ARTIFACT --format "
            "hf-dense -o DIR' or '--onnx')")


def cpu_note(device: str, model) -> str | None:
    """One line naming the packed layers that would rebuild their dense weight on every decode step on
    the CPU (no fast path, no SPARSIFY_CPU_CACHE); None when there are none, or off the CPU."""
    from sparsify.runtime.densify import sparse_modules

    if model is None or str(device).startswith("cuda"):
        return None
    mods = sparse_modules(model).values()
    def decode_path(m) -> str:
        x = torch.empty(1, m.in_features, dtype=getattr(torch, m.attrs["dtype"]))  # (1 token, in)
        return kernels.kernel_name(x, m.fmt, m.attrs, m.packed())

    slow = [m for m in mods if decode_path(m) == "cpu-unpack"]
    if not slow:
        return None
    formats = sorted({m.fmt + (f"+{m.attrs['quant']}" if m.attrs.get("quant") else "") for m in slow})
    mb = sum(m.in_features * m.out_features * getattr(torch, m.attrs["dtype"]).itemsize for m in slow) / 2**20
    return CPU_NOTE.format(slow=len(slow), total=len(mods), formats=", ".join(formats), mb=mb)
