"""`prune()`: model argument -> calibrated, pruned (and quantized), packed artifact directory.

The offline step only: resolve and load the checkpoint, draw calibration data, run the
block-by-block runner with the chosen pruner (quantizing each weight right after, or inside
SparseGPT's column loop), then pack every targeted weight and write the artifact atomically.
Bare ``.safetensors`` files (no config) go to `sparsify.bare`.
"""
from __future__ import annotations

import dataclasses
import resource
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from sparsify import __version__, registry
from sparsify.calibrate import runner
from sparsify.config import PruneConfig
from sparsify.errors import UserError
from sparsify.exporters.artifact import ArtifactWriter, check_output, copy_side_files
from sparsify.formats import format_for
from sparsify.packing import pack_weight, skip_reason, totals


def method_config(pruner, args: dict):
    fields = {f.name for f in dataclasses.fields(pruner.config_cls)}
    unknown = set(args) - fields
    if unknown:
        raise UserError(f"method {pruner.name!r} has no option {sorted(unknown)}: known options are {sorted(fields) or 'none'}")
    return pruner.config_cls(**args)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _max_text_len(config) -> int | None:
    text = getattr(config, "text_config", None) or config
    return getattr(text, "max_position_embeddings", None)


def calibration_batches(loaded, calib) -> list[dict]:
    from sparsify.calibrate.batches import build_batches

    return build_batches(loaded.family.inputs, calib, tokenizer=loaded.tokenizer,
                         image_size=loaded.image_size, image_mean=loaded.image_mean,
                         image_std=loaded.image_std, max_text_len=_max_text_len(loaded.config))


def select_targets(model, config: PruneConfig) -> tuple[dict[str, dict[str, torch.nn.Linear]], dict[str, str]]:
    """Targeted Linears grouped by block ({block: {name: Linear}}), and {name: reason} for skipped ones."""
    from sparsify.models.layout import find_targets

    targets, skipped = {}, {}
    for block_name, names in find_targets(model, config.targets, config.ignore).items():
        for name in names:
            lin = model.get_submodule(name)
            reason = skip_reason(lin.weight, config.scheme)
            if reason:
                skipped[name] = reason
            else:
                targets.setdefault(block_name, {})[name] = lin
    if not targets:
        raise UserError("no layer can be pruned: check --targets / --ignore and the scheme"
                        + (f" ({next(iter(skipped.values()))})" if skipped else ""))
    return targets, skipped


def make_layer_fn(pruner, config: PruneConfig, method_cfg, spec):
    """(weight, stats) -> (pruned weight, quant params or None): the per-layer step of the runner."""
    from sparsify.quant import rtn

    def step(weight: torch.Tensor, stats):
        if spec is not None and pruner.joint_quant and config.joint_quant:
            # Scales come from a first, unquantized pass: the OBS updates grow weights past the dense
            # weight's range, and scales fitted to the dense weight would clip them (measured worse).
            first = pruner.prune(weight, stats, config.scheme, config.sparsity, config.per, method_cfg)
            quantize = rtn.column_quantizer(first, spec)
            new = pruner.prune(weight, stats, config.scheme, config.sparsity, config.per, method_cfg,
                               quantize=quantize)
            return rtn.snap(new, quantize.params), quantize.params  # exactly on the grid in weight's dtype
        new = pruner.prune(weight, stats, config.scheme, config.sparsity, config.per, method_cfg)
        if spec is None:
            return new, None
        return rtn.fake_quantize(new, spec)

    return step


def prune_model(loaded, config: PruneConfig, pruner, method_cfg, spec=None):
    """Prune (and quantize) ``loaded.model`` in place.

    Returns (pruned Linears by name, quant params by name, skipped {name: reason}, calibration info).
    """
    from sparsify.models.layout import find_blocks

    model = loaded.model
    targets, skipped = select_targets(model, config)
    calib_info, batches, make_acc = None, [], None
    if pruner.stats:
        batches = calibration_batches(loaded, config.calib)
        acc_cls = registry.ACCUMULATORS[pruner.stats]
        make_acc = lambda n: acc_cls(n, device=config.device)  # noqa: E731
        c = config.calib
        tokens = sum(int(b["attention_mask"].sum()) for b in batches if "attention_mask" in b)
        calib_info = {"source": c.source, "samples": c.samples, "seq_len": c.seq_len, "seed": c.seed,
                      "batches": len(batches), "tokens": tokens}
    step, qparams = make_layer_fn(pruner, config, method_cfg, spec), {}

    def on_block(block_targets, stats):
        for name, lin in block_targets.items():
            new, qparams[name] = step(lin.weight.data, stats[name])
            lin.weight.data.copy_(new)

    runner.run(model, find_blocks(model), targets, batches, make_acc, on_block, device=config.device)
    flat = {name: lin for block in targets.values() for name, lin in block.items()}
    return flat, qparams, skipped, calib_info


def write_artifact(loaded, flat: dict, qparams: dict, config: PruneConfig, out: Path, overwrite: bool,
                   manifest: dict) -> dict:
    """Pack targeted weights, copy the rest as they are, dedupe tied tensors, write atomically."""
    fmt, options = format_for(config.scheme)
    entries, tied, seen = {}, {}, {}
    state = loaded.model.state_dict(keep_vars=False)
    with ArtifactWriter(out, overwrite) as w:
        for name, tensor in state.items():
            module = name.rpartition(".")[0]
            key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
            if tensor.numel() and key in seen:
                tied[name] = seen[key]
                continue
            seen[key] = name
            if module in flat and name.endswith(".weight"):
                quant = qparams.get(module)
                opts = options if quant is None else {**options, "quant": quant}
                packed, entries[name] = pack_weight(module, tensor.to("cpu"), fmt, opts)
                for k, t in packed.items():
                    w.tensors.add(f"{module}.{k}", t)
            else:
                w.tensors.add(name, tensor)
        copy_side_files(loaded.source.config_dir, w.tmp)
        manifest.update(tensors=entries, tied=tied, totals=totals(entries))
        w.manifest = manifest
    return manifest


def prune(model: str, config: PruneConfig, out: str | Path, *, overwrite: bool = False,
          cache_dir: str | None = None, trust_remote_code: bool = False) -> dict:
    """Prune ``model`` (path or alias) with ``config`` into the artifact directory ``out``; returns the manifest."""
    from sparsify.models.load import load_model, resolve, sha256_files
    from sparsify.quant.spec import QuantSpec

    source = resolve(model, cache_dir=cache_dir)
    out = check_output(out, [source.path, *source.weight_files], overwrite)
    pruner = registry.get(registry.PRUNERS, config.method, "method")
    method_cfg = method_config(pruner, config.method_args)
    spec = QuantSpec.parse(config.quant, config.group_size)
    format_for(config.scheme)  # fail early on schemes without a packed format
    if source.kind == "safetensors-file":
        from sparsify.bare import prune_bare

        if spec is not None or config.distill_steps:
            raise UserError("a bare .safetensors file supports magnitude pruning only: drop --quant/--distill-steps "
                            "or pass the model directory (with config.json)")
        return prune_bare(source, config, pruner, method_cfg, out, overwrite)
    t0 = time.perf_counter()
    loaded = load_model(source, dtype=config.dtype, device=config.device, trust_remote_code=trust_remote_code)
    t1 = time.perf_counter()
    flat, qparams, skipped, calib_info = prune_model(loaded, config, pruner, method_cfg, spec)
    prune_s, calibrate_prune_s = time.perf_counter() - t0, time.perf_counter() - t1
    distill = None
    if config.distill_steps:
        from sparsify.distill import distill_model

        distill = distill_model(loaded, flat, qparams, config, source, lr=config.distill_lr, mode=config.distill_mode)
    manifest = {
        "sparsify_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(source.path), "alias": source.alias, "family": loaded.family.name,
                   "model_type": loaded.config.model_type, "files": sha256_files(source)},
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "config": {**config.to_json(), "method_args": dataclasses.asdict(method_cfg)},
        "quant": None if spec is None else spec.to_json(),
        "calibration": calib_info, "distill": distill, "skipped": skipped,
        "timing": {"prune_s": round(prune_s, 2), "calibrate_prune_s": round(calibrate_prune_s, 2), "peak_rss_mb": round(peak_rss_mb(), 1)},
    }
    return write_artifact(loaded, flat, qparams, config, out, overwrite, manifest)
