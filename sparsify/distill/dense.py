"""Where the dense (unpruned) weights come from: the teacher model, or the checkpoint files themselves.

End-to-end mode loads the whole dense model beside the student (`load_teacher`); block-wise mode
needs only each targeted Linear's dense weight while its block trains (`DenseWeights`), read one
tensor at a time so that no second model is ever held.
"""
from __future__ import annotations

import torch
from safetensors import safe_open
from torch import nn


def load_teacher(loaded, source, device: str) -> nn.Module:
    """The dense model at ``source``, frozen, in the student's dtype."""
    from sparsify.models.load import load_model

    return load_model(source, dtype=str(loaded.dtype).removeprefix("torch."), device=device).model.requires_grad_(False)


class DenseWeights:
    """The checkpoint's own (dense) weights of named Linears, read one tensor at a time from the
    safetensors files where a file key is the module name (+ ``.weight``, possibly under a prefix).
    Names that transformers renames on load (e.g. ViT's ``encoder.layer.*.attention.attention.query``
    -> ``layers.*.attention.q_proj``) are taken once from a full dense model, ``load_teacher()``,
    kept on CPU, and the model freed."""

    def __init__(self, source, names: list[str], load_teacher):
        where = {}
        for f in source.weight_files:
            with safe_open(str(f), "pt") as fh:
                where.update(dict.fromkeys(fh.keys(), f))
        self.files, self.held = {}, {}
        for name in names:
            key = f"{name}.weight"
            hits = [key] if key in where else [k for k in where if k.endswith("." + key)]
            if len(hits) == 1:
                self.files[name] = (where[hits[0]], hits[0])
        missing = [n for n in names if n not in self.files]
        if missing:
            teacher = load_teacher()
            self.held = {n: teacher.get_submodule(n).weight.detach().to("cpu", copy=True) for n in missing}
            del teacher

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        if name in self.held:
            return self.held[name].to(device=like.device, dtype=like.dtype)
        path, key = self.files[name]
        with safe_open(str(path), "pt") as fh:
            return fh.get_tensor(key).to(device=like.device, dtype=like.dtype)
