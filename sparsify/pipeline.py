"""`prune()`: model argument -> calibrated, pruned (and quantized), packed artifact directory.

The offline step only: resolve and load the checkpoint, resolve the per-layer plan (CLI flags,
``--plan`` rules), let the allocator set per-layer sparsity, run the block-by-block runner with
each layer's pruner (quantizing each weight right after, or inside SparseGPT's column loop), then
pack every compressed weight in its own format and write the artifact atomically. Bare
``.safetensors`` files (no config) go to `sparsify.bare`. Under torchrun the calibration is
data-parallel and rank 0 alone finishes and writes (`sparsify.calibrate.distributed`).
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

from sparsify import registry
from sparsify.calibrate.batches import calibration_batches
from sparsify.calibrate.spill import spill_dir
from sparsify.config import PruneConfig
from sparsify.errors import UserError
from sparsify.exporters.artifact import ArtifactWriter, check_output, copy_side_files
from sparsify.formats import format_for
from sparsify.packing import ModelPacker, totals
from sparsify.plan import config_rules
from sparsify.planning import Planned, build_plan, check_finite_weights, method_config
from sparsify.resources import peak_rss_mb
from sparsify.version import __version__


def calibration_info(batches: list[dict], calib) -> dict:
    """What calibration actually used: tokens counted, the window length actually run (it may be capped)."""
    tokens, used = 0, 0
    for b in batches:
        if "attention_mask" in b:
            tokens += int(b["attention_mask"].sum())
        if "input_ids" in b:
            used = max(used, int(b["input_ids"].shape[-1]))
    info = {"source": calib.source, "samples": calib.samples, "seq_len": used or calib.seq_len, "seed": calib.seed,
            "batches": len(batches), "tokens": tokens}
    if used and used != calib.seq_len:
        info["seq_len_requested"] = calib.seq_len
    return info


def allocate(loaded, planned: Planned, config: PruneConfig, batches) -> tuple[Planned, dict | None]:
    """Run the configured allocator over the plan; returns the plan with per-layer sparsities set."""
    from sparsify.allocators.base import AllocationContext
    from sparsify.models.layout import find_blocks

    allocator = registry.get(registry.ALLOCATORS, config.allocation, "allocation")
    options = method_config(allocator, config.allocation_args, "allocation")
    if config.allocation == "uniform":
        return planned, None
    ctx = AllocationContext(loaded.model, planned.plans, planned.active, find_blocks(loaded.model), batches,
                            device=config.device, numel=planned.numel(), family=loaded.family.name)
    plans, info = allocator.allocate(ctx, options)
    return dataclasses.replace(planned, plans=plans), {"name": allocator.name, "options": dataclasses.asdict(options),
                                                       **info}


def active_plans(planned: Planned) -> dict:
    return {n: planned.plans[n] for mods in planned.active.values() for n in mods}


def finish_artifact(w, packer, loaded, manifest: dict, extra: dict | None) -> dict:
    """The extra tensors, the side files and the manifest (with the packer's entries) of an open writer."""
    for name, tensor in (extra or {}).items():
        w.tensors.add(name, tensor)
    copy_side_files(loaded.source.config_dir, w.tmp)
    manifest.update(tensors=packer.entries, tied=packer.tied, totals=totals(packer.entries))
    w.manifest = manifest
    return manifest


def write_artifact(loaded, planned: Planned, qparams: dict, out: Path, overwrite: bool, manifest: dict,
                   extra: dict | None = None) -> dict:
    """Pack each compressed weight in its plan's format, copy the rest as it is, dedupe tied tensors;
    ``extra``: more tensors by name (Double Sparsity's channel rankings)."""
    with ArtifactWriter(out, overwrite) as w:
        packer = ModelPacker(w.tensors, active_plans(planned), planned.modules)
        packer.add(loaded.model.state_dict(keep_vars=False), qparams)
        return finish_artifact(w, packer, loaded, manifest, extra)


def plan_json(planned: Planned, rules, source) -> dict:
    """The resolved plan for the manifest: each target's plan plus its format (``--plan`` reads it back)."""
    layers = {}
    for name, p in planned.plans.items():
        fmt = "unchanged" if name in planned.skipped else format_for(p.parsed_scheme)[0]
        layers[name] = {**p.to_json(), "format": fmt}
    return {"source": source, "rules": rules or [], "layers": layers}


def prune(model: str, config: PruneConfig, out: str | Path, *, overwrite: bool = False,
          cache_dir: str | None = None, trust_remote_code: bool = False,
          save_allocation: str | None = None) -> dict | None:
    """Prune ``model`` (path or alias) with ``config`` into the artifact directory ``out``; returns the manifest.

    ``save_allocation``: also write the resolved (allocated) plan there as a rules file. Under torchrun
    (`sparsify.calibrate.distributed`) the calibration is data-parallel, rank 0 writes and returns the
    manifest, the other processes write nothing and return None.
    """
    from sparsify.calibrate import distributed

    distributed.check_supported(config)
    with distributed.session(config.device):
        return _prune(model, config, out, overwrite=overwrite, cache_dir=cache_dir,
                      trust_remote_code=trust_remote_code, save_allocation=save_allocation)


def _prune(model: str, config: PruneConfig, out: str | Path, *, overwrite: bool, cache_dir: str | None,
           trust_remote_code: bool, save_allocation: str | None) -> dict | None:
    from sparsify.calibrate import distributed
    from sparsify.models.load import load_model, resolve, sha256_files
    from sparsify.pruning import PruneResult, prune_model
    from sparsify.quant.spec import QuantSpec

    source = distributed.main_first(resolve, model, cache_dir=cache_dir)
    with distributed.agreed():  # rank 0 alone checks the output; a model that fails to load on one node stops all
        out = check_output(out, [source.path, *source.weight_files], overwrite) if distributed.is_main() else Path(out)
        rules, rules_source = config_rules(config)
        method_config(registry.get(registry.ALLOCATORS, config.allocation, "allocation"), config.allocation_args,
                      "allocation")  # bad allocator options fail before the model loads
        if save_allocation and not Path(save_allocation).resolve().parent.is_dir():
            raise UserError(f"--save-allocation {save_allocation}: its directory does not exist: create it first")
        spec = QuantSpec.parse(config.quant, config.group_size)
        format_for(config.scheme)  # a scheme without a packed format fails before the model loads
        if source.kind == "safetensors-file":
            from sparsify.bare import prune_bare

            if distributed.world() > 1:
                raise UserError(f"a bare .safetensors file (no calibration) {distributed.SINGLE}")
            if spec is not None or config.distill_steps or rules or config.allocation != "uniform" or config.attention:
                raise UserError("a bare .safetensors file supports magnitude pruning only: drop --quant / "
                                "--distill-steps / --plan / --allocation / --attention, or pass the model directory "
                                "(with config.json)")
            pruner = registry.get(registry.PRUNERS, config.method, "method")
            return prune_bare(source, config, pruner, method_config(pruner, config.method_args), out, overwrite)
        t0 = time.perf_counter()
        stream = config.max_memory is not None
        loaded = load_model(source, dtype=config.dtype, device=config.device, trust_remote_code=trust_remote_code,
                            meta=stream)
        planned = build_plan(loaded.model, config, rules)
        streamed = None
        if stream:
            from sparsify.streaming import prepare

            streamed = prepare(loaded, planned, config)  # checks, plans, reads the rest
        check_finite_weights(loaded.model)  # streamed: only the computed buffers; blocks are checked when read
        attention = None
        if config.attention is not None:
            from sparsify.attention.artifact import AttentionCalibration

            attention = AttentionCalibration(loaded, config.attention)
    t1 = time.perf_counter()
    cache: dict = {}

    def batches():
        if "batches" not in cache:
            with distributed.agreed():  # first asked for at the same point on every process
                cache["batches"] = calibration_batches(loaded, config.calib)
        return cache["batches"]

    planned, allocation = allocate(loaded, planned, config, batches)
    if save_allocation:
        from sparsify.plan import save_rules

        with distributed.agreed():
            if distributed.is_main():
                save_rules(planned.plans, save_allocation, note=f"sparsify {config.allocation} allocation of {model}")
    result = PruneResult()
    late_quant = bool(config.distill_steps) and config.distill_quant == "after"  # round after distilling
    with ArtifactWriter(out, overwrite) if stream and distributed.is_main() else nullcontext() as w:
        residency, spilled = None, config.activations == "disk"
        if stream:
            from sparsify.streaming import BlockStreamer

            packer = ModelPacker(w.tensors, active_plans(planned), planned.modules) if w is not None else None
            weights, outside, head, streaming = streamed
            residency = BlockStreamer(weights, packer, result, config.device, outside, head)
            spilled = streaming["activations"] == "disk"  # the plan's choice (config.activations "auto")
        with spill_dir(out) if spilled else nullcontext() as spill:
            prune_model(loaded.model, planned, batches, device=config.device, joint_quant=config.joint_quant,
                        observers=attention.observers if attention else None, residency=residency, result=result,
                        spill=spill, quantize=not late_quant)
        if not distributed.is_main():
            return None  # rank 0 finishes alone: attention rankings, manifest, artifact
        attention_section, attention_tensors = None, None
        if attention is not None:
            used = calibration_info(cache["batches"], config.calib)["seq_len"]
            attention_section, attention_tensors = attention.finish(config.calib, used)
        prune_s, calibrate_prune_s = time.perf_counter() - t0, time.perf_counter() - t1
        distill = None
        if config.distill_steps:
            from sparsify.distill import distill_model

            flat = {n: m for mods in planned.active.values() for n, m in mods.items()}
            specs = {n: planned.plans[n].quant_spec for n in flat} if late_quant else None
            distill = distill_model(loaded, flat, result.qparams, config, source, lr=config.distill_lr,
                                    mode=config.distill_mode, specs=specs)
        default_method = registry.get(registry.PRUNERS, config.method, "method")
        manifest = {
            "sparsify_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {"path": str(source.path), "alias": source.alias, "family": loaded.family.name,
                       "model_type": loaded.config.model_type, "files": sha256_files(source)},
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "config": {**config.to_json(),
                       "method_args": dataclasses.asdict(method_config(default_method, config.method_args))},
            "quant": None if spec is None else spec.to_json(),
            "plan": plan_json(planned, rules, rules_source), "allocation": allocation,
            "calibration": calibration_info(cache["batches"], config.calib) if "batches" in cache else None,
            "distill": distill, "attention": attention_section, "skipped": planned.skipped, "solver": result.solver,
            "warnings": result.warnings,
            "timing": {"prune_s": round(prune_s, 2), "calibrate_prune_s": round(calibrate_prune_s, 2),
                       "peak_rss_mb": round(peak_rss_mb(), 1),
                       **({"processes": distributed.world()} if distributed.world() > 1 else {})},
        }
        if stream:
            manifest["streaming"] = streaming
            residency.finish()
            return finish_artifact(w, packer, loaded, manifest, attention_tensors)
    return write_artifact(loaded, planned, result.qparams, out, overwrite, manifest, extra=attention_tensors)
