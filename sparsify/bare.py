"""Pruning a bare ``.safetensors`` file (no config.json): data-free methods only, streamed.

Tensors are read one at a time with `safe_open`, pruned if targeted, packed and appended to the
streaming writer, so memory holds a few tensors at most whatever the file size. Without a config
the model cannot run, so calibrated methods are refused up front.
"""
from __future__ import annotations

import dataclasses
import re
import time
from datetime import datetime, timezone

from sparsify import __version__
from sparsify.errors import UserError
from sparsify.exporters.artifact import ArtifactWriter
from sparsify.formats import format_for
from sparsify.packing import pack_weight, skip_reason, totals

_IN_BLOCK = re.compile(r"\.\d+\.")  # a repeated block: layers.3., layer.3., h.3., blocks.3.
_NEVER = re.compile(r"embed|norm|lm_head|(^|\.)head\.|ln_|layernorm", re.IGNORECASE)


def default_targets(names: list[str], shapes: dict[str, list[int]]) -> list[str]:
    """Matrices inside repeated blocks, never embeddings, norms or the output head."""
    return [n for n in names if n.endswith(".weight") and len(shapes[n]) == 2
            and _IN_BLOCK.search(n) and not _NEVER.search(n)]


def prune_bare(source, config, pruner, method_cfg, out, overwrite: bool) -> dict:
    from safetensors import safe_open

    from sparsify import progress
    from sparsify.models.layout import select
    from sparsify.models.load import sha256_files
    from sparsify.pipeline import peak_rss_mb

    if pruner.stats:
        raise UserError(f"method {pruner.name!r} needs calibration data, which needs the model's config.json: "
                        "pass the model directory (config.json + safetensors) or use --method magnitude")
    t0 = time.perf_counter()
    fmt, options = format_for(config.scheme)
    path = source.path
    entries, skipped = {}, {}
    with safe_open(str(path), framework="pt") as f, ArtifactWriter(out, overwrite) as w:
        names = list(f.keys())
        shapes = {n: list(f.get_slice(n).get_shape()) for n in names}
        if config.targets:
            chosen = select(names, config.targets, config.ignore)
        else:
            chosen = default_targets(names, shapes)
            chosen = select(chosen, None, config.ignore) if config.ignore else chosen
        if not chosen:
            raise UserError(f"{path.name}: no tensor matches the targets: pass --targets (e.g. '*proj.weight')")
        chosen = set(chosen)
        with progress.bar(f"pruning {path.name}", total=len(names)) as advance:
            for name in names:
                tensor = f.get_tensor(name)
                reason = skip_reason(tensor, config.scheme) if name in chosen else "not targeted"
                if reason is None:
                    pruned = pruner.prune(tensor, None, config.scheme, config.sparsity, config.per, method_cfg)
                    module = name.removesuffix(".weight")
                    packed, entries[name] = pack_weight(module, pruned, fmt, options)
                    for k, t in packed.items():
                        w.tensors.add(f"{module}.{k}", t)
                else:
                    if name in chosen:
                        skipped[name] = reason
                    w.tensors.add(name, tensor)
                del tensor
                advance()
        w.manifest = {
            "sparsify_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {"path": str(path), "alias": None, "family": None, "model_type": None,
                       "files": sha256_files(source)},
            "dtype": None, "config": {**config.to_json(), "method_args": dataclasses.asdict(method_cfg)}, "calibration": None,
            "skipped": skipped, "tensors": entries, "tied": {}, "totals": totals(entries),
            "timing": {"prune_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak_rss_mb(), 1)},
        }
        manifest = w.manifest
    return manifest
