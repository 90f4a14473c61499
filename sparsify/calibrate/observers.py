"""Observers: per-block statistics beyond the targets' inputs, for methods that need them.

An observer is a factory ``observer(block) -> context manager``; the runner enters it for the
statistics pass of each block and hands what ``as`` gave to ``on_block``.

`qk_observer` sees each attention module's queries and keys *after* rotary embedding, per head.
It works for every architecture whose attention calls transformers' attention interface
(``ALL_ATTENTION_FUNCTIONS``, the path of Llama, Mistral, Qwen, Gemma, Phi-3, ...): while active it
points the block's configs at a registered function that records q and k, then calls the
implementation the model had (its module's own eager function, or sdpa, flash, ...), so outputs
are unchanged. Models whose attention does not go through the interface record nothing, which
`QKStats.tokens == 0` shows.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from torch import nn

_NAME = "sparsify_observe"
_ACTIVE: dict[int, tuple[QKStats, str | None]] = {}  # id(attention module) -> (stats, original implementation)


class QKStats:
    """Sums over calibration tokens, per key-value head and channel, of |q_c k_c|, |q_c| and |k_c|,
    and the range [kmin, kmax] of every key channel (the label cache's calibrated quantization grid).

    Grouped-query attention pools the query heads that share a key-value head (query head h reads
    key-value head h // (heads / kv_heads)). Means are the sums divided by ``tokens`` x group size.
    """

    def __init__(self):
        self.qk = self.q = self.k = None
        self.kmin = self.kmax = None  # (kv, d) smallest / largest key value per channel
        self.tokens = 0
        self.group = 1  # query heads per key-value head

    def add(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """q (batch, heads, T, d) and k (batch, kv_heads, T, d), both after rotary embedding."""
        b, heads, t, d = q.shape
        kv = k.shape[1]
        if k.shape[2] != t or heads % kv:
            raise ValueError(f"queries {list(q.shape)} and keys {list(k.shape)} do not pair up")
        qg = q.detach().float().reshape(b, kv, heads // kv, t, d)  # (b, kv, group, T, d)
        kf = k.detach().float()  # (b, kv, T, d)
        sums = {"qk": (qg * kf[:, :, None]).abs().sum((0, 2, 3)),  # (kv, d)
                "q": qg.abs().sum((0, 2, 3)), "k": kf.abs().sum((0, 2))}  # (kv, d)
        for key, value in sums.items():
            prev = getattr(self, key)
            setattr(self, key, value if prev is None else prev + value)
        lo, hi = kf.amin((0, 2)), kf.amax((0, 2))  # (kv, d)
        self.kmin = lo if self.kmin is None else torch.minimum(self.kmin, lo)
        self.kmax = hi if self.kmax is None else torch.maximum(self.kmax, hi)
        self.tokens += b * t
        self.group = heads // kv

    def reduce(self, all_reduce) -> None:
        """Data parallel: sum the sums and token counts of every process, min / max the key ranges
        (``all_reduce(tensor, op)`` in place; tensors not allocated, when nothing was seen, stay None)."""
        for key, op in (("qk", "sum"), ("q", "sum"), ("k", "sum"), ("kmin", "min"), ("kmax", "max")):
            if getattr(self, key) is not None:
                all_reduce(getattr(self, key), op)  # (kv, d)
        self.tokens = int(all_reduce(torch.tensor(self.tokens, dtype=torch.int64), "sum"))

    def means(self) -> dict[str, torch.Tensor]:
        """{"qk", "q", "k"}: (kv_heads, d) means per token (and per pooled query head where q enters)."""
        if self.tokens == 0:
            return {}
        pooled = self.tokens * self.group
        return {"qk": self.qk / pooled, "q": self.q / pooled, "k": self.k / self.tokens}


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    stats, original = _ACTIVE[id(module)]
    stats.add(query, key)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    impl = ALL_ATTENTION_FUNCTIONS.get_interface(original, eager) if original not in (None, "eager") else eager
    if impl is None:
        impl = ALL_ATTENTION_FUNCTIONS["sdpa"]
    return impl(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _NAME not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(_NAME, _recording_attention)


@contextmanager
def qk_observer(block: nn.Module):
    """Yields {attention module name (inside the block): QKStats} filled during the block's forwards."""
    _register()
    stats: dict[str, QKStats] = {}
    configs: dict[int, tuple[object, str | None]] = {}
    for name, module in block.named_modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "_attn_implementation") or not hasattr(module, "head_dim"):
            continue
        configs.setdefault(id(config), (config, config._attn_implementation))
        stats[name] = QKStats()
        _ACTIVE[id(module)] = (stats[name], configs[id(config)][1])
    try:
        for config, _ in configs.values():
            config._attn_implementation = _NAME
        yield stats
    finally:
        for config, original in configs.values():
            config._attn_implementation = original
        for _, module in block.named_modules():
            _ACTIVE.pop(id(module), None)
