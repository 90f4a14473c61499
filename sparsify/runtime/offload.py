"""Running an artifact larger than memory: accelerate places what fits and offloads the rest to disk.

`load_artifact(path, max_memory=...)` builds the model with every tensor on meta (shapes and dtypes
from the safetensors headers), then lets accelerate's own placement engine decide
(`infer_auto_device_map` under the budget, whole blocks kept together) and dispatch
(`dispatch_model`): modules placed on "cpu" are read in now, modules placed on "disk" get
accelerate's hooks, which read their tensors from the artifact's safetensors files right before each
forward and drop them after. Nothing is copied: the offload index points into the artifact's own
files, and packed tensors are read packed (a `SparseLinear`'s buffers are its format's tensors).

The budget handed to accelerate is ``--max-memory`` less 10% allocator slack (as in the streamed
prune's plan: mapped pages of a file being read, fragmentation), a reserve for the activations of a
forward and a fixed workspace (`activation_reserve`); accelerate itself keeps room for the largest
offloaded block beside what it places. Each block's forward ends with a trim of glibc's heaps.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from sparsify.errors import UserError
from sparsify.exporters.safetensors_io import DTYPE_CODES
from sparsify.resources import trim_freed_memory
from sparsify.streaming import SLACK

_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def header_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple[Path, str]]]:
    """({name: meta tensor of its shape and dtype}, {name: (file, key)}) of a (sharded) safetensors set,
    from the headers alone."""
    index = directory / "model.safetensors.index.json"
    files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()}) \
        if index.exists() else [directory / "model.safetensors"]
    tensors, where = {}, {}
    for f in files:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for key, info in header.items():
            if key != "__metadata__":
                tensors[key] = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]], device="meta")
                where[key] = (f, key)
    return tensors, where


WORKSPACE = 48 << 20  # bytes: evaluation data, tokenizer work, dense unpacks of one layer (measured ~25 MB)


def activation_reserve(model, tokens: int = 2048) -> int:
    """Bytes kept back for one forward: ~16 hidden-sized float32 rows per token plus two rows of
    logits (the logits, and a window's log-softmax beside them: `eval.perplexity`), for ``tokens``
    tokens (an evaluation batch of 4 x 512), and `WORKSPACE`."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(config, "hidden_size", 1024) or 1024
    vocab = getattr(config, "vocab_size", 0) or 0
    return tokens * (16 * hidden + 2 * vocab) * 4 + WORKSPACE


def dispatch(model, where: dict[str, tuple[Path, str]], cap: int, tokens: int = 2048):
    """Place ``model`` (every tensor on meta, tied ones tied) under ``cap`` bytes with accelerate;
    returns its device map."""
    from accelerate import dispatch_model, infer_auto_device_map

    from sparsify.models.stream import StreamedWeights
    from sparsify.resources import return_freed_memory

    budget = int(cap / (1 + SLACK)) - activation_reserve(model, tokens)  # the streamed prune's allocator slack
    if budget <= 0:
        raise UserError(f"--max-memory {cap / 2**20:,.0f} MiB leaves nothing beside one forward's activations "
                        f"({activation_reserve(model, tokens) / 2**20:,.0f} MiB): raise --max-memory")
    no_split = list(getattr(model, "_no_split_modules", None) or [])  # transformers names its blocks for accelerate
    device_map = infer_auto_device_map(model, max_memory={"cpu": budget}, no_split_module_classes=no_split)
    if "cpu" not in device_map.values():
        raise UserError(f"--max-memory {cap / 2**20:,.1f} MiB holds no part of this model beside one forward's "
                        f"activations ({activation_reserve(model, tokens) / 2**20:,.1f} MiB) and room to run its "
                        "largest block: raise --max-memory")
    state = model.state_dict(keep_vars=True)
    resident = [n for n in state if _placed(n, device_map) == "cpu"]
    StreamedWeights(model, where=where).load(resident)  # tied names share one tensor, read once
    offload_index = {n: {"safetensors_file": str(where[n][0]), "weight_name": where[n][1]}
                     for n in state if n in where and n not in resident}
    computed = {n: b for n, b in model.named_buffers() if n not in where and b.device.type != "meta"}
    return_freed_memory()  # blocks read and dropped at every forward: hand their memory back
    dispatch_model(model, device_map=device_map, main_device="cpu", offload_index=offload_index,
                   offload_buffers=True, state_dict=computed)  # buffers built at construction stay in memory
    for module in model.modules():  # glibc trims only a heap's top by itself: the resident memory crept
        if type(module).__name__ in no_split:  # up block after block, forward after forward (measured)
            module.register_forward_hook(_trim_after)
    return device_map


def _trim_after(module, args, output) -> None:
    trim_freed_memory()


def _placed(name: str, device_map: dict[str, object]) -> object:
    """The device of the device-map entry that covers tensor ``name`` (the longest module prefix)."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in device_map:
            return device_map[key]
    raise KeyError(name)
