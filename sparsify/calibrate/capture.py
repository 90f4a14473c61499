"""Capture what every block of a block list receives: block 0's hidden states, and each block's own
other arguments (masks, rotary tables, positions).

Other arguments may differ per block: Gemma-2 alternates sliding-window and full attention masks,
Gemma-3 passes local or global rotary tables by layer type. So they are recorded for every block,
never reused from block 0. One pass per batch costs one real forward of block 0 only: while
capturing, every block's ``forward`` is replaced by a recorder; block 0's recorder also runs the
real block (its output gives the shape of what a block returns), later blocks pass their input
hidden states through in that shape, and the last block stops the model (`Stop`). Tensors shared
by several blocks (the usual case) are stored once.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sparsify.tensors import to_device


class Stop(Exception):
    """Raised inside a forward once everything needed has been recorded."""


@dataclass
class Call:
    """How a block is called, less its hidden states: ``positional`` says where the hidden states go."""

    positional: bool
    args: tuple  # positional arguments after the hidden states
    kwargs: dict  # keyword arguments without ``hidden_states``

    @classmethod
    def split(cls, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Call]:
        if args:
            return args[0], cls(True, tuple(args[1:]), dict(kwargs))
        rest = dict(kwargs)
        return rest.pop("hidden_states"), cls(False, (), rest)

    def __call__(self, block: nn.Module, hidden: torch.Tensor, device):
        args, kwargs = to_device(self.args, device), to_device(self.kwargs, device)
        if self.positional:
            return block(hidden.to(device), *args, **kwargs)
        return block(*args, hidden_states=hidden.to(device), **kwargs)


def hidden_of(out):
    """A block's output hidden states (blocks return a tensor or a tuple whose first item it is)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def with_hidden(template, hidden):
    """``template`` (a block's output: a tensor or a tuple led by one) with ``hidden`` as its hidden states."""
    if isinstance(template, (tuple, list)):
        return type(template)((hidden, *template[1:]))
    return hidden


@contextmanager
def patched_forwards(blocks, forwards):
    """Each block's ``forward`` replaced by the matching function while active, restored exactly after
    (an instance attribute that was there before, e.g. a hook framework's, comes back as it was)."""
    patched = []
    try:
        for block, forward in zip(blocks, forwards):
            patched.append((block, "forward" in block.__dict__, block.__dict__.get("forward")))
            block.forward = forward
        yield
    finally:
        for block, had, original in patched:
            if had:
                block.forward = original
            else:
                del block.forward


def capture(model: nn.Module, layers: nn.ModuleList, batches: list[dict], device, store, hidden=None):
    """Run ``model`` on each batch up to the end of ``layers``.

    Args:
        hidden: where block 0's inputs go (a list, or `calibrate.spill.DiskActivations`); a new list if None.

    Returns:
        (hidden, calls): ``hidden[j]`` the input of block 0 for batch j (on ``store``), and
        ``calls[i][j]`` the `Call` (other arguments, on ``store``) of block i for batch j.
    """
    hidden = [] if hidden is None else hidden
    calls: list[list[Call]] = [[] for _ in layers]
    memo: dict = {}
    state: dict = {}
    last = len(layers) - 1

    def recorder(i, real_forward):
        def forward(*args, **kwargs):
            x, call = Call.split(args, kwargs)
            calls[i].append(Call(call.positional, to_device(call.args, store, memo), to_device(call.kwargs, store, memo)))
            if i == 0:
                hidden.append(x.to(store))
            if i == last:
                raise Stop
            if i == 0:
                state["template"] = real_forward(*args, **kwargs)
                return state["template"]
            return with_hidden(state["template"], x)
        return forward

    try:
        with patched_forwards(layers, [recorder(i, block.forward) for i, block in enumerate(layers)]):
            with torch.inference_mode():
                for batch in batches:
                    try:
                        model(**to_device(batch, device))
                    except Stop:
                        pass
    finally:
        memo.clear()
    if len(hidden) != len(batches) or any(len(c) != len(batches) for c in calls):
        raise RuntimeError(f"captured {len(hidden)} of {len(batches)} batches: not every block ran")
    return hidden, calls
