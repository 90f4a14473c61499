"""`SparseLinear`: a Linear whose weight lives as packed tensors and runs through the kernel dispatch.

Buffers are named after the format's keys, so the module's state-dict keys are exactly the
artifact's ``{module}.{key}`` names. For decode-sized inputs (at most ``kernels.MEMO_TOKENS`` tokens)
the module remembers which implementation the dispatch picked, per token count, dtype, device and
dispatch environment: at batch-1 decode the choice costs as much as a small layer's matmul.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsify import kernels


class SparseLinear(nn.Module):
    def __init__(self, fmt: str, attrs: dict, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None):
        super().__init__()
        self.fmt, self.attrs = fmt, dict(attrs)
        self.out_features, self.in_features = attrs["shape"]
        self.keys = list(tensors)
        for key, t in tensors.items():
            self.register_buffer(key, t)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._paths: dict = {}  # (tokens, dtype, device, dispatch env) -> implementation

    def packed(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.keys}

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense (out, in) tensor (zeros where pruned)."""
        from sparsify import formats

        return formats.unpack(self.fmt, self.packed(), self.attrs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed, tokens = self.packed(), x.numel() // x.shape[-1]
        if tokens > kernels.MEMO_TOKENS or torch.compiler.is_compiling():
            return kernels.linear(x, self.fmt, packed, self.attrs, self.bias)
        key = (tokens, x.dtype, x.device, kernels.env_key())
        impl = self._paths.get(key)
        if impl is None:
            impl = self._paths[key] = kernels.IMPLS[kernels.kernel_name(x, self.fmt, self.attrs, packed)]
        return impl(x, self.fmt, packed, self.attrs, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, format={self.fmt}, attrs={self.attrs}"
