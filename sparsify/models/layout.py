"""Find the repeated transformer blocks and the Linears to prune in them, for any architecture.

A block list is an ``nn.ModuleList`` of modules of one class that contain Linears, not nested in
another such list (Llama ``model.layers``, BERT ``encoder.layer``, ViT ``encoder.layer``, CLIP's two
``encoder.layers``). Lists are returned in registration order, which is forward order for every
supported family (CLIP: text tower, then vision tower, the order CLIPModel declares them; each
tower is calibrated on its own inputs, so the order between towers does not matter).
"""
from __future__ import annotations

import fnmatch
import re

from torch import nn

from sparsify.errors import UserError


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def find_blocks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """[(prefix, ModuleList)] of the repeated blocks, outermost lists only."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1 or not _has_linear(mod[0]):
            continue
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        found.append((name, mod))
    return found


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select(names: list[str], targets: list[str] | None, ignore: list[str] | None) -> list[str]:
    """Names matching any target pattern (all when None) minus those matching an ignore pattern.

    Patterns are fnmatch globs, or regular expressions when prefixed with ``re:``. A pattern that
    matches nothing is an error (it is almost always a typo)."""
    for pattern in (targets or []) + (ignore or []):
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise UserError(f"pattern {pattern!r} is not a valid regular expression ({e})") from None
        if not any(_matches(n, pattern) for n in names):
            raise UserError(f"pattern {pattern!r} matches no layer; names look like: {', '.join(names[:3])}")
    chosen = [n for n in names if targets is None or any(_matches(n, p) for p in targets)]
    return [n for n in chosen if not any(_matches(n, p) for p in (ignore or []))]


def find_targets(model: nn.Module, targets: list[str] | None = None,
                 ignore: list[str] | None = None) -> dict[str, list[str]]:
    """Block name (``prefix.i``) -> the Linear names to prune in it, in module order.

    Default: every Linear inside the blocks; ``targets`` / ``ignore`` patterns select among those
    names (embeddings, norms and the output head are never pruned in this version).
    """
    block_of: dict[str, str] = {}
    for prefix, layers in find_blocks(model):
        for i, block in enumerate(layers):
            for sub, mod in block.named_modules():
                if isinstance(mod, nn.Linear):
                    block_of[f"{prefix}.{i}.{sub}"] = f"{prefix}.{i}"
    in_blocks = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n in block_of]
    out: dict[str, list[str]] = {}
    for name in select(in_blocks, targets, ignore):
        out.setdefault(block_of[name], []).append(name)
    return out
