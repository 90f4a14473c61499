"""From a loaded model and a run's config to its resolved per-layer plan, before anything is pruned.

`build_plan` finds the targets (Linear / Conv1D inside the repeated blocks, narrowed by
``--targets`` / ``--ignore``), resolves the plan rules for each, checks every layer's method,
quantization and format up front (errors before any work), and sets aside layers whose shape
cannot take their scheme. `estimate_bytes` gives a layer's packed size without its real weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sparsify import plan as plan_rules
from sparsify.config import PruneConfig
from sparsify.errors import UserError
from sparsify.formats import format_for
from sparsify.models.targets import layout_of, weight_of
from sparsify.packing import skip_reason
from sparsify.plan import LayerPlan


KEPT = "method none: weights copied unchanged"  # the skip reason of layers whose method keeps them


@dataclass
class Planned:
    """The resolved plan of a model: what each target gets, grouped as the runner needs it."""

    plans: dict[str, LayerPlan]  # every target module, skipped ones included
    modules: dict[str, nn.Module]  # module name -> Linear / Conv1D
    blocks: dict[str, list[str]]  # block name -> its target module names, forward order
    skipped: dict[str, str] = field(default_factory=dict)  # module -> why it stays as it was

    @property
    def active(self) -> dict[str, dict[str, nn.Module]]:
        """{block: {name: module}} of the layers that will be compressed."""
        out: dict[str, dict[str, nn.Module]] = {}
        for block, names in self.blocks.items():
            kept = {n: self.modules[n] for n in names if n not in self.skipped}
            if kept:
                out[block] = kept
        return out

    def numel(self) -> dict[str, int]:
        return {n: m.weight.numel() for n, m in self.modules.items()}


def check_layer(p: LayerPlan) -> None:
    """Fail early on an unknown method, a bad quantization or a scheme without a packed format."""
    from sparsify import registry

    pruner = registry.get(registry.PRUNERS, p.method, "method")
    method_config(pruner, p.method_args)
    spec = p.quant_spec
    format_for(p.parsed_scheme)
    if spec is not None and p.parsed_scheme.kind == "block":
        raise UserError(f"{p.module}: block schemes are stored unquantized (bsr): drop the quantization for "
                        "block layers (--quant none, or a plan rule with quant: none)")


def method_config(impl, args: dict, what: str = "method"):
    """``impl.config_cls`` (a pruner's or allocator's options) from ``KEY=VALUE`` args; unknown keys are an error."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(impl.config_cls)}
    unknown = set(args) - fields
    if unknown:
        raise UserError(f"{what} {impl.name!r} has no option {sorted(unknown)}: known options are {sorted(fields) or 'none'}")
    return impl.config_cls(**args)


def build_plan(model: nn.Module, config: PruneConfig, rules: list[dict] | None = None) -> Planned:
    from sparsify import registry
    from sparsify.models.layout import find_targets

    by_block = find_targets(model, config.targets, config.ignore)
    names = [n for block in by_block.values() for n in block]
    if not names:
        raise UserError("no layer can be pruned: check --targets / --ignore")
    plans = plan_rules.resolve(names, config, rules)
    modules = {n: model.get_submodule(n) for n in names}
    skipped = {}
    for name, p in plans.items():
        if p.skip:
            skipped[name] = "plan: skip"
            continue
        check_layer(p)
        if registry.get(registry.PRUNERS, p.method, "method").keeps_weights:
            skipped[name] = KEPT
            continue
        reason = skip_reason(weight_of(modules[name]), p.parsed_scheme)
        if reason:
            skipped[name] = reason
    planned = Planned(plans, modules, by_block, skipped)
    if not planned.active and KEPT not in skipped.values():
        raise UserError("no layer can be pruned: check --targets / --ignore, the plan and the scheme"
                        + (f" ({next(iter(skipped.values()))})" if skipped else ""))
    return planned


def check_finite_tensor(name: str, t: torch.Tensor) -> None:
    """UserError naming ``name`` when the (read) tensor holds NaN / inf; meta tensors are not checked."""
    if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
        raise UserError(f"tensor {name} holds NaN/inf values: the checkpoint is corrupt; fix or re-export it")


def check_finite_weights(model: nn.Module, prefix: str = "") -> None:
    """NaN / inf anywhere in the weights: one error naming the tensor, before any work (``prefix``:
    the module's name in its model, for a block checked on its own)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        check_finite_tensor(f"{prefix}.{name}" if prefix else name, t)


def estimate_bytes(shape: tuple[int, int], dtype: torch.dtype, p: LayerPlan, rows: int = 16) -> int:
    """Packed bytes of an (out, in) weight under plan ``p``, from packing ``rows`` synthetic rows.

    Every format's size grows linearly with the rows (values, masks, scales are per row); the
    estimate scales the packed size of a random (rows, in) weight pruned to the plan's pattern.
    """
    from sparsify.formats import pack
    from sparsify.formats.base import nbytes
    from sparsify.pruners.masks import apply_mask, mask_for
    from sparsify.quant import rtn

    out, inp = shape
    if p.skip:
        return out * inp * torch.empty((), dtype=dtype).element_size()
    r = min(out, rows)
    w = torch.randn(r, inp, generator=torch.Generator().manual_seed(0)).to(dtype)  # (r, in)
    scheme = p.parsed_scheme
    w = apply_mask(w, mask_for(w.float().abs(), scheme, p.sparsity, p.per))
    fmt, options = format_for(scheme)
    spec = p.quant_spec
    if spec is not None:
        w, params = rtn.fake_quantize(w, spec)
        options = {**options, "quant": params}
    return round(nbytes(pack(fmt, w, **options)[0]) * out / r)


def describe(model: str, config: PruneConfig, *, cache_dir: str | None = None,
             trust_remote_code: bool = False) -> dict:
    """`sparsify plan`: the resolved per-layer table of a run, without pruning anything.

    Returns {"model", "allocation", "layers": [{module, shape, layout, method, scheme, sparsity, quant,
    format, est_bytes, dense_bytes, skip_reason}], "totals": {...}}. Allocators other than uniform
    set sparsities at prune time (they need calibration): the table shows the plan they start from.
    """
    from sparsify.models.load import load_model, resolve

    source = resolve(model, cache_dir=cache_dir)
    if source.kind != "hf-dir":
        raise UserError(f"{model} is a bare .safetensors file: 'sparsify plan' needs the model directory (config.json)")
    rules, _ = plan_rules.config_rules(config)
    loaded = load_model(source, dtype=config.dtype, trust_remote_code=trust_remote_code)
    planned = build_plan(loaded.model, config, rules)
    rows = []
    for name, p in planned.plans.items():
        w = weight_of(planned.modules[name])  # (out, in)
        dense = w.numel() * w.element_size()
        reason = planned.skipped.get(name)
        est = dense if reason else estimate_bytes(tuple(w.shape), w.dtype, p)
        rows.append({"module": name, "shape": list(w.shape), "layout": layout_of(planned.modules[name]),
                     "method": p.method, "scheme": p.scheme, "sparsity": p.effective_sparsity if not reason else 0.0,
                     "quant": p.quant, "format": "unchanged" if reason else format_for(p.parsed_scheme)[0],
                     "est_bytes": est, "dense_bytes": dense, "skip_reason": reason})
    est, dense = sum(r["est_bytes"] for r in rows), sum(r["dense_bytes"] for r in rows)
    numel = {r["module"]: r["shape"][0] * r["shape"][1] for r in rows}
    kept = sum(numel[r["module"]] * (1 - r["sparsity"]) for r in rows)
    return {"model": str(model), "allocation": config.allocation, "layers": rows,
            "totals": {"layers": len(rows), "compressed": len(rows) - len(planned.skipped),
                       "sparsity": 1 - kept / max(1, sum(numel.values())), "est_bytes": est, "dense_bytes": dense,
                       "ratio": est / max(1, dense)}}
