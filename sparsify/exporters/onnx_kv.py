"""Decoder ONNX graphs with the KV cache, and the greedy-generation check that proves them.

Without a cache every generated token recomputes the whole prefix. The graph here is one decoding
step in the layout optimum and onnxruntime-genai use:

  inputs   input_ids (batch, seq) int64, attention_mask (batch, past + seq) int64,
           position_ids (batch, seq) int64 (when the model takes them),
           past_key_values.{i}.key / .value (batch, kv_heads_i, past, head_dim_i) float32
  outputs  logits (batch, seq, vocab), present.{i}.key / .value (batch, kv_heads_i, past + seq, head_dim_i)

The first step feeds empty pasts (past = 0) and the prompt; each later step feeds the new token and
the previous step's presents. Per-layer head counts and widths are read from a real forward of the
model (never from config names, which differ between architectures). Models whose cache is not a
stack of per-layer key / value tensors (recurrent or linear-attention layers) get no cache graph;
`probe_cache` says why. Mixture-of-experts layers are traced with transformers' ``batched_mm``
experts (the same math; its grouped kernel has no ONNX form and eager routing is data-dependent).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

GREEDY_TOKENS = 16


@dataclass
class CacheShape:
    """Per layer: (kv heads, key width, value width); ``cache_arg`` is the forward's cache keyword."""
    layers: list[tuple[int, int, int]]
    cache_arg: str
    positions: bool

    def empty(self, batch: int, dtype=torch.float32) -> list[torch.Tensor]:
        """Zero-length pasts for a first step: k0, v0, k1, v1, ..."""
        return [torch.zeros(batch, h, 0, d, dtype=dtype) for h, dk, dv in self.layers for d in (dk, dv)]

    def names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{i}.{kv}" for i in range(len(self.layers)) for kv in ("key", "value")]


def _layers_of(out) -> list | None:
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    layers = getattr(cache, "layers", None)
    if not layers or not all(getattr(lay, "keys", None) is not None and getattr(lay, "keys").dim() == 4
                             and getattr(lay, "values", None) is not None for lay in layers):
        return None
    return layers


@torch.inference_mode()
def probe_cache(model: nn.Module, sample: dict) -> tuple[CacheShape | None, str]:
    """The cache layout of ``model`` from one forward on ``sample`` (or None and the reason)."""
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
    if cache_arg is None:
        return None, f"{type(model).__name__}.forward takes no cache"
    try:
        out = model(input_ids=sample["input_ids"][:1], use_cache=True)
    except Exception as e:  # noqa: BLE001 - any architecture-specific failure means: no cache graph
        return None, f"a forward with use_cache=True failed ({type(e).__name__})"
    layers = _layers_of(out)
    if layers is None:
        return None, "its cache is not per-layer key / value tensors"
    shape = [(lay.keys.shape[1], lay.keys.shape[3], lay.values.shape[3]) for lay in layers]
    return CacheShape(shape, cache_arg, "position_ids" in params), ""


class KVWrap(nn.Module):
    """One decoding step: (input_ids, attention_mask[, position_ids], k0, v0, ...) -> (logits, k0', v0', ...)."""

    def __init__(self, model: nn.Module, shape: CacheShape):
        super().__init__()
        self.model, self.shape = model, shape
        pasts = shape.names("past_key_values")
        self.outputs = ["logits", *shape.names("present")]
        self.axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                     **({"position_ids": {0: "batch", 1: "seq"}} if shape.positions else {}),
                     **{n: {0: "batch", 2: "past"} for n in pasts}}
        self.output_axes = {"logits": {0: "batch", 1: "seq"}, **{n: {0: "batch", 2: "total"} for n in self.outputs[1:]}}

    def forward(self, input_ids, attention_mask, *rest):
        from transformers import DynamicCache

        position_ids, past = (rest[0], rest[1:]) if self.shape.positions else (None, rest)
        dtype = next(self.model.parameters()).dtype
        cache = DynamicCache()  # full layers: sliding-window models mask, they do not crop
        for i in range(len(self.shape.layers)):
            cache.update(past[2 * i].to(dtype), past[2 * i + 1].to(dtype), i)
        kw = {"position_ids": position_ids} if self.shape.positions else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{self.shape.cache_arg: cache}, **kw)
        return (out.logits, *[t for lay in _layers_of(out) for t in (lay.keys, lay.values)])

    def inputs(self, text: dict, past: int) -> dict:
        """Graph inputs for ``text`` (input_ids, attention_mask) after ``past`` cached tokens of random values."""
        ids, mask = text["input_ids"], text["attention_mask"]  # (B, T)
        g = torch.Generator().manual_seed(past)
        out = {"input_ids": ids, "attention_mask": torch.cat([torch.ones(ids.shape[0], past, dtype=mask.dtype),
                                                              mask], 1)}  # (B, past + T)
        if self.shape.positions:
            out["position_ids"] = torch.arange(past, past + ids.shape[1]).expand(ids.shape[0], -1)  # (B, T)
        for name, t in zip(self.shape.names("past_key_values"), self.shape.empty(ids.shape[0])):
            out[name] = torch.randn(t.shape[0], t.shape[1], past, t.shape[3], generator=g)  # (B, kv, past, d)
        return out

    def run(self, inputs: dict):
        return self(*inputs.values())

    @staticmethod
    def export_args(inputs: dict, axes: dict, dims: dict) -> tuple[tuple, dict, dict]:
        """(positional args, no keyword args, torch.export's dynamic shapes): all after the mask are ``*rest``."""
        spec = {k: {ax: dims[d] for ax, d in axes[k].items()} for k in inputs}
        names = list(inputs)
        dynamic = {"input_ids": spec["input_ids"], "attention_mask": spec["attention_mask"],
                   "rest": tuple(spec[n] for n in names[2:])}
        return tuple(inputs.values()), {}, dynamic

    def step(self, ids, mask, positions, past):
        """`greedy`'s step through this module (the artifact in PyTorch)."""
        return self(ids, mask, *([positions] if self.shape.positions else []), *past)


def ort_step(session, shape: CacheShape):
    """`greedy`'s step through an onnxruntime session of the cache graph."""
    names = ["input_ids", "attention_mask", *(["position_ids"] if shape.positions else []),
             *shape.names("past_key_values")]

    def step(ids, mask, positions, past):
        values = [ids, mask, *([positions] if shape.positions else []), *past]
        feeds = {n: v.numpy() if v.dtype == torch.long else v.float().numpy() for n, v in zip(names, values)}
        return [torch.from_numpy(o) for o in session.run(None, feeds)]
    return step


def experts_for_export(model: nn.Module) -> None:
    """Switch mixture-of-experts layers to transformers' ``batched_mm`` (traceable, same results)."""
    can = getattr(model, "_can_set_experts_implementation", None)
    if callable(can) and can():
        try:
            model.set_experts_implementation("batched_mm")
        except Exception:  # noqa: BLE001 - an implementation this transformers lacks: trace what is there
            pass


def greedy(step, prompt: torch.Tensor, past: list, n: int = GREEDY_TOKENS) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding of ``n`` tokens through ``step(ids, mask, positions, past) -> (logits, *present)``.

    Returns the tokens and each step's last-position logits (1-D float32), for tie checks.
    """
    tokens, logits_seen, cur, total = [], [], prompt, 0  # cur (1, T)
    for _ in range(n):
        t = cur.shape[1]
        mask = torch.ones(1, total + t, dtype=torch.long)
        positions = torch.arange(total, total + t)[None]  # (1, T)
        logits, *past = step(cur, mask, positions, past)
        last = logits[0, -1].float()  # (vocab,)
        tokens.append(int(last.argmax()))
        logits_seen.append(last)
        total, cur = total + t, torch.tensor([[tokens[-1]]])
    return tokens, logits_seen


def compare_greedy(ref: tuple[list[int], list], got: list[int], tolerance: float) -> dict:
    """Token-for-token agreement; a first difference at a numerical tie of the reference is reported, not failed.

    A tie: the reference's logits for its token and for the ONNX token differ by at most ``tolerance``
    x max |logits| at that step, the error the logits check already allows.
    """
    tokens, logits = ref
    first = next((i for i, (a, b) in enumerate(zip(tokens, got)) if a != b), None)
    result = {"greedy_tokens": len(tokens), "greedy_match": first is None, "greedy_reference": tokens,
              "greedy_onnx": got}
    if first is not None:
        step = logits[first]
        margin = float(step[tokens[first]] - step[got[first]])
        result.update(greedy_first_difference=first, greedy_margin=margin,
                      greedy_tie=margin <= tolerance * float(step.abs().max()))
    return result
