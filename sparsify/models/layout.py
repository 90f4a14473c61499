"""Find the repeated transformer blocks and the matrices to prune in them, for any architecture.

No per-family code: a block list is an ``nn.ModuleList`` of one or more modules of one class that
contain a prunable matrix (`sparsify.models.targets`: ``nn.Linear`` or transformers' ``Conv1D``),
not nested inside another such list (Llama ``model.layers``, GPT-2 ``transformer.h``, BERT
``encoder.layer``, ViT ``vit.layers``, CLIP ``vision_model.encoder.layers`` and
``text_model.encoder.layers``). Fused projections (``qkv_proj``, ``query_key_value``, ``c_attn``,
``gate_up_proj``) are ordinary targets. Mixture-of-experts layers in transformers 5 (Mixtral, Qwen-MoE)
hold their experts as fused 3-D parameters and route with a plain parameter, not as Linears: those
are no targets, and such a model prunes its attention projections (and any dense MLP) only.
A Linear owned by ``nn.MultiheadAttention`` is never a target either: that module reads
``out_proj.weight`` directly instead of calling it, so a packed replacement would be bypassed.

Order: the lists come back in **forward order**, the order in which their first blocks run. With
one list that is trivial. With several (CLIP) a tiny probe forward (batch 1, a few zero tokens
and/or a zero image, built from the forward signature and the config) records which first block
runs first; CLIPModel runs the vision tower, then the text tower. If the probe cannot run, the
lists keep their declaration order (CLIP: text, then vision). The towers of a two-tower model are
independent, so either order calibrates to the same result; the probe only keeps the order honest.
"""
from __future__ import annotations

import fnmatch
import inspect
import re
from collections.abc import Iterable

import torch
from torch import nn

from sparsify.errors import UserError
from sparsify.models.targets import is_target


def _has_target(module: nn.Module) -> bool:
    return any(is_target(m) for m in module.modules())


def _declared_blocks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Outermost block lists in declaration (named_modules) order."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1 or not _has_target(mod[0]):
            continue
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue  # nested inside a block list already found (named_modules visits parents first)
        found.append((name, mod))
    return found


def _probe_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Smallest inputs the forward accepts: 4 zero token ids and/or one zero image."""
    params = inspect.signature(model.forward).parameters
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None) or config
    device = next(model.parameters()).device
    inputs = {}
    if "input_ids" in params:
        inputs["input_ids"] = torch.zeros(1, 4, dtype=torch.long, device=device)  # (1, T)
    if "pixel_values" in params and getattr(vision, "image_size", None):
        size, channels = vision.image_size, getattr(vision, "num_channels", 3)
        dtype = next(model.parameters()).dtype
        inputs["pixel_values"] = torch.zeros(1, channels, size, size, dtype=dtype, device=device)  # (1, C, H, W)
    return inputs


def _forward_order(model: nn.Module, lists: list[tuple[str, nn.ModuleList]]) -> list[tuple[str, nn.ModuleList]]:
    """Sort block lists by when their first block runs in a probe forward (declaration order if it cannot run)."""
    seen: list[str] = []
    handles = [layers[0].register_forward_pre_hook(lambda *_, p=prefix: seen.append(p)) for prefix, layers in lists]
    try:
        with torch.no_grad():
            model(**_probe_inputs(model))
    except Exception:  # noqa: BLE001 - a model whose probe fails keeps its declaration order
        return lists
    finally:
        for h in handles:
            h.remove()
    first = {p: i for i, p in reversed(list(enumerate(seen)))}
    return sorted(lists, key=lambda item: first.get(item[0], len(seen)))


def _no_blocks(model: nn.Module) -> UserError:
    """The one-line error for a model without block lists, naming what it lacks."""
    name = type(model).__name__
    empty = next((n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1
                  and len({type(b) for b in m}) == 1 and any(True for _ in m[0].parameters())), None)
    if empty is not None:
        return UserError(f"{name}: its repeated blocks {empty} hold no nn.Linear or Conv1D layer (their weights are "
                         "other parameters): sparsify finds nothing to prune in this architecture")
    return UserError(f"{name} has no repeated transformer blocks (an nn.ModuleList of same-class modules with "
                     "nn.Linear or Conv1D layers): sparsify cannot prune this architecture")


def find_blocks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """[(prefix, ModuleList)] of the repeated blocks, outermost lists only, in forward order.

    A model with none is a one-line UserError saying whether the blocks or their Linears are missing.
    """
    lists = _declared_blocks(model)
    if not lists:
        raise _no_blocks(model)
    return _forward_order(model, lists) if len(lists) > 1 else lists


def block_index(name: str, prefixes: Iterable[str]) -> tuple[str, int] | None:
    """(block list prefix, block number) of the module ``name``, or None when it lies outside every list.

    ``block_index("model.layers.3.mlp.up_proj", ["model.layers"]) == ("model.layers", 3)``.
    """
    for prefix in prefixes:
        head, sep, rest = name.partition(prefix + ".")
        if sep and not head:
            index = rest.split(".", 1)[0]
            if index.isdigit():
                return prefix, int(index)
    return None


def matches(name: str, pattern: str) -> bool:
    """fnmatch glob, or ``re:REGEX`` searched anywhere in the name."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _check_patterns(names: list[str], patterns: list[str]) -> None:
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise UserError(f"pattern {pattern!r} is not a valid regular expression ({e}): fix it") from None
        if not any(matches(n, pattern) for n in names):
            sample = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise UserError(f"pattern {pattern!r} matches no layer: fix it; names look like: {sample}")


def select(names: list[str], targets: list[str] | None, ignore: list[str] | None) -> list[str]:
    """Names matching any target pattern (all when ``targets`` is None) minus those matching an ignore pattern.

    Patterns are fnmatch globs (``*q_proj``), or regular expressions searched anywhere in the name
    when prefixed with ``re:`` (``re:layers\\.(0|1)\\.``). A pattern that matches nothing is a
    UserError: it is almost always a typo. Order of ``names`` is kept.
    """
    _check_patterns(names, (targets or []) + (ignore or []))
    chosen = [n for n in names if targets is None or any(matches(n, p) for p in targets)]
    return [n for n in chosen if not any(matches(n, p) for p in (ignore or []))]


def _target_names(model: nn.Module) -> list[str]:
    """Every prunable module's name, except the Linears that ``nn.MultiheadAttention`` reads by weight."""
    owned = {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
             for c, _ in m.named_children()}
    return [n for n, m in model.named_modules() if is_target(m) and n not in owned]


def find_targets(model: nn.Module, targets: list[str] | None = None,
                 ignore: list[str] | None = None) -> dict[str, list[str]]:
    """Block name (``prefix.i``) -> names of the matrices to prune in it, blocks in forward order.

    Default: every ``nn.Linear`` / ``Conv1D`` inside the blocks (not those of ``nn.MultiheadAttention``);
    ``targets`` / ``ignore`` patterns select among those. Matrices outside the blocks (output head,
    CLIP projections, a ViT classifier, BERT's pooler) are never pruned in this version: the
    block-by-block runner has no stage for them.
    """
    blocks = find_blocks(model)
    prefixes = [p for p, _ in blocks]
    linears = _target_names(model)
    where = {n: block_index(n, prefixes) for n in linears}
    inside = [n for n in linears if where[n] is not None]
    candidates = inside
    order = {p: i for i, p in enumerate(prefixes)}
    chosen = sorted(select(candidates, targets, ignore),
                    key=lambda n: (order[where[n][0]], where[n][1]) if where[n] else (len(order), 0))
    out: dict[str, list[str]] = {}
    for name in chosen:
        key = f"{where[name][0]}.{where[name][1]}" if where[name] else name
        out.setdefault(key, []).append(name)
    return out
