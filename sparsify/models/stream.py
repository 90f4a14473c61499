"""A model's weights read from its safetensors files part by part, for a skeleton built on meta.

`sparsify.models.load.load_model(..., meta=True)` builds the model with every parameter on the meta
device (buffers computed as at construction). `StreamedWeights.load(names)` then materialises those
tensors from the checkpoint and `release(module)` sends a module's back to meta, so a
run holds the parts it works on and no more: the streaming prune keeps the embeddings, final norm and
head plus one block (`sparsify.streaming`).

Each load opens the files it needs (memory-mapped), copies the tensors out and closes them again:
pages of a mapping that stays open count as this process's resident memory once touched, and would
add up to the whole checkpoint over a run. Values are cast to the skeleton's dtype, as transformers'
``from_pretrained`` does, so a streamed block equals the in-memory one bit for bit. Tied parameters
(one Parameter under several names, e.g. a head tied to the embeddings) are loaded once, from the
first of their names that the checkpoint holds, and assigned to every name. Checkpoint keys are mapped
to the model's names by transformers' own renaming rules (legacy names, the base model prefix); a
tensor that transformers converts on load (fused experts, split projections) is refused, naming it.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from sparsify.errors import UserError


def _header_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return list(fh.keys())


def _conversion_rules(model) -> tuple:
    """transformers' (renamings, converters) for this model; () where this transformers has no such rules."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key  # noqa: F401
    except ImportError:
        return ()
    rules = get_model_conversion_mapping(model)
    return [r for r in rules if not isinstance(r, WeightConverter)], [r for r in rules if isinstance(r, WeightConverter)]


def tie_groups(model: nn.Module) -> dict[str, list[str]]:
    """Every parameter / persistent buffer name -> all names of the same tensor object, in state_dict order."""
    by_id: dict[int, list[str]] = defaultdict(list)
    for name, t in model.state_dict(keep_vars=True).items():
        by_id[id(t)].append(name)
    return {n: names for names in by_id.values() for n in names}


class StreamedWeights:
    """Which checkpoint file and key holds each tensor of ``model``; load and release by module prefix."""

    def __init__(self, model: nn.Module, weight_files: list | None = None, device: str = "cpu",
                 where: dict[str, tuple[object, str]] | None = None):
        """``weight_files``: a checkpoint's safetensors files, whose keys are mapped to the model's names;
        or ``where``: {model name: (file, key)} when the files already use the model's names (an artifact)."""
        self.model, self.device = model, device
        self.groups = tie_groups(model)
        self.where: dict[str, tuple[object, str]] = dict(where or {})  # model name -> (file, checkpoint key)
        self.loaded: set[str] = set()
        self._renames, self._meta_state = None, model.state_dict(keep_vars=True)
        for path in weight_files or []:
            for key in _header_keys(path):
                self.where.setdefault(self._model_name(key), (path, key))
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        missing = [n for n in self.groups if n in params and not any(t in self.where for t in self.groups[n])]
        if missing:  # a buffer computed at construction may be absent from the checkpoint
            raise UserError(f"the checkpoint holds no tensor for {missing[0]} ({len(missing)} missing): "
                            "drop --max-memory to load it whole")
        for name in self.groups:  # a tied tensor is read under whichever of its names the checkpoint holds
            if name not in self.where:
                twin = next((t for t in self.groups[name] if t in self.where), None)
                if twin is not None:
                    self.where[name] = self.where[twin]

    def _model_name(self, key: str) -> str:
        """The model's name for checkpoint ``key``, by transformers' own renaming rules (legacy names,
        base model prefix); UserError for a tensor that transformers converts (fuses, splits) on load."""
        if self._renames is None:
            self._renames = _conversion_rules(self.model)
        if not self._renames:
            return key
        from transformers.core_model_loading import rename_source_key

        renamings, converters = self._renames
        name, converter = rename_source_key(key, renamings, converters, getattr(self.model, "base_model_prefix", None),
                                            self._meta_state)
        if converter is not None:
            raise UserError(f"transformers converts the checkpoint tensor {key} on load ({converter}), which "
                            "--max-memory cannot stream yet: drop --max-memory to load it whole")
        return name

    def names_under(self, prefix: str) -> list[str]:
        return [n for n in self.groups if n.startswith(prefix + ".")] if prefix else list(self.groups)

    def nbytes(self, names) -> int:
        """Bytes the named tensors take once loaded (tied ones once)."""
        sd = self.model.state_dict(keep_vars=True)
        seen, total = set(), 0
        for n in names:
            t = sd[n]
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def current(self, name: str) -> torch.Tensor:
        owner, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(owner), attr)

    def load(self, names) -> None:
        """Read the named tensors (and their tied twins) from the checkpoint, once each: parameters
        leave meta; persistent buffers take the checkpoint's values over those computed at construction.
        Each file is mapped for one tensor at a time, so its pages never add up beside the copies."""
        from safetensors import safe_open

        for n in names:
            if n not in self.where or n in self.loaded:  # not in the files, or read under a tied twin
                continue
            path, key = self.where[n]
            old = self.current(n)
            with safe_open(str(path), "pt") as fh:  # closed (unmapped) right after the copy
                value = fh.get_tensor(key).to(old.dtype)
                self._assign(n, value.to(self.device, copy=True), old)  # a copy owns its memory

    def _assign(self, name: str, value: torch.Tensor, old: torch.Tensor) -> None:
        new = nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value
        for twin in self.groups[name]:
            owner, _, attr = twin.rpartition(".")
            module = self.model.get_submodule(owner)
            if attr in module._parameters:
                module._parameters[attr] = new
            else:
                module._buffers[attr] = new
            self.loaded.add(twin)

    def release(self, module: nn.Module) -> None:
        """Send every tensor of a block back to meta (freed once nothing else holds it); not read again."""
        module.to("meta")

    def unload(self, names) -> None:
        """Send the named tensors (and their tied twins) back to meta; `load` may read them again."""
        for n in names:
            old = self.current(n)
            if old.device.type == "meta":
                continue
            meta = old.to("meta")
            self._assign(n, meta, old)
            self.loaded.difference_update(self.groups[n])
