"""Pruning a bare ``.safetensors`` file (no config.json): data-free methods only, streamed.

Tensors are read one at a time with `safe_open`, pruned if targeted, packed and appended to the
streaming writer, so memory holds a few tensors at most whatever the file size. Without a config
the model cannot run, so calibrated methods are refused up front.

Default targets (no ``--targets``), decided from names, shapes and dtypes alone since there is no
model to inspect: every 2-D floating-point (F16 / BF16 / F32 / F64) tensor named ``*.weight``,
whatever its module is called, except
- embeddings: a name part containing ``embed`` or ``token_type``, or named ``wte`` / ``wpe`` / ``shared``
  (T5's token table) / ``relative_attention_bias``;
- norms: a name part containing ``norm`` (LayerNorm, RMSNorm, ...) or ``ln_*`` / ``ln1`` (GPT-2's
  ``ln_f``); norm weights are 1-D anyway;
- output heads: ``lm_head``, ``head``, ``*_head``, ``score``, or a part containing ``classifier``
  (DeiT's ``cls_classifier``): they map hidden states to vocabulary / class logits, the layer whose
  pruning costs the most quality for the least size (and that the model-directory path skips too).
Integer, bool and fp8 tensors (indices, masks, already-quantized codes) and tensors that are not 2-D
are never default targets. With an N:M scheme, GPT-2-style Conv1D names (``c_attn``, ``c_fc``,
``c_proj``, ``q_attn``) are skipped unless ``--targets`` names them: those weights are stored
(in, out), and without config.json nothing says so. A checkpoint that names its matrices otherwise takes ``--targets``.

Options mean what they mean on the model-directory path: ``--dtype`` converts every floating-point
tensor (targets and the rest) before pruning, ``--device`` is where each target is pruned (refused
when absent), and the manifest records the dtype the artifact holds and the device that computed.
"""
from __future__ import annotations

import dataclasses
import re
import time
from datetime import datetime, timezone

from sparsify.errors import UserError
from sparsify.exporters.artifact import ArtifactWriter
from sparsify.formats import format_for
from sparsify.packing import pack_weight, skip_reason, totals
from sparsify.resources import peak_rss_mb
from sparsify.version import __version__

FLOATS = ("F16", "BF16", "F32", "F64")  # safetensors dtype names the pruners compute in
# Never default targets (module docstring), tested on each part of the dotted module name:
_PART_HAS = re.compile(r"embed|token_type|norm|classifier", re.IGNORECASE)  # embeddings, norms, heads
_PART_IS = re.compile(r"wte|wpe|shared|relative_attention_bias"  # embeddings
                      r"|ln(_.*|\d*)"  # GPT-2-style norms
                      r"|head|.*_head|score", re.IGNORECASE)  # output heads (lm_head, ...)


# transformers' Conv1D modules (GPT-2 family) store their weight transposed; a bare file cannot say so
_CONV1D = re.compile(r"(^|\.)(c_attn|c_fc|c_proj|q_attn)\.weight$")


def _excluded(module: str) -> bool:
    return any(_PART_HAS.search(part) or _PART_IS.fullmatch(part) for part in module.split("."))


def default_targets(names: list[str], shapes: dict[str, list[int]], dtypes: dict[str, str]) -> list[str]:
    """The 2-D floating-point ``*.weight`` tensors that are not embeddings, norms or output heads."""
    return [n for n in names if (n == "weight" or n.endswith(".weight")) and len(shapes[n]) == 2
            and dtypes[n] in FLOATS and not _excluded(n.removesuffix("weight").rstrip("."))]


def _stored_dtype(dtypes: dict[str, str], asked: str | None) -> str | None:
    """The float dtype the artifact holds: the asked one, else the file's own when it has a single one."""
    if asked:
        return asked
    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
    found = {names[d] for d in dtypes.values() if d in names}
    return found.pop() if len(found) == 1 else None


def prune_bare(source, config, pruner, method_cfg, out, overwrite: bool) -> dict:
    import torch
    from safetensors import safe_open

    from sparsify import progress
    from sparsify.models.layout import select
    from sparsify.models.load import check_device, sha256_files

    if pruner.stats:
        raise UserError(f"method {pruner.name!r} needs calibration data, which needs the model's config.json: "
                        "pass the model directory (config.json + safetensors) or use --method magnitude")
    device = check_device(config.device)
    cast = getattr(torch, config.dtype) if config.dtype else None
    t0 = time.perf_counter()
    fmt, options = format_for(config.scheme)
    path = source.path
    entries, skipped = {}, {}
    with safe_open(str(path), framework="pt") as f, ArtifactWriter(out, overwrite) as w:
        names = list(f.keys())
        shapes = {n: list(f.get_slice(n).get_shape()) for n in names}
        dtypes = {n: f.get_slice(n).get_dtype() for n in names}
        if config.targets:
            chosen = select(names, config.targets, config.ignore)
        else:
            chosen = default_targets(names, shapes, dtypes)
            chosen = select(chosen, None, config.ignore) if config.ignore else chosen
        if not chosen:
            raise UserError(f"{path.name}: no tensor matches the targets: pass --targets (e.g. '*proj.weight')")
        chosen = set(chosen)
        with progress.bar(f"pruning {path.name}", total=len(names)) as advance:
            for name in names:
                tensor = f.get_tensor(name)
                if cast is not None and dtypes[name] in FLOATS:
                    tensor = tensor.to(cast)
                reason = skip_reason(tensor, config.scheme) if name in chosen else "not targeted"
                if reason is None and config.scheme.kind == "nm" and not config.targets and _CONV1D.search(name):
                    reason = ("GPT-2-style Conv1D name: stored (in, out), so N:M groups would run along the wrong "
                              "dimension; pass the model directory (config.json) or name it in --targets")
                if reason is None:
                    pruned = pruner.prune(tensor.to(device), None, config.scheme, config.sparsity, config.per,
                                          method_cfg).to("cpu")
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
            "dtype": _stored_dtype(dtypes, config.dtype), "calibration": None,
            "config": {**config.to_json(), "device": device, "method_args": dataclasses.asdict(method_cfg)},
            "skipped": skipped, "tensors": entries, "tied": {}, "totals": totals(entries),
            "timing": {"prune_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak_rss_mb(), 1)},
        }
        manifest = w.manifest
    return manifest
