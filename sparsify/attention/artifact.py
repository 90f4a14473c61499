"""Double Sparsity in the prune pipeline and in the artifact.

`AttentionCalibration` is what `sparsify.pipeline.prune` drives: it checks the model up front,
hands the runner its observer, and after the block-by-block pass turns the statistics into the
channel rankings (choosing the statistic for ``auto``), the tensors ``ds.layers.{i}.channels``
(int16 (kv_heads, head_dim), most important channel first), for a per-channel label grid
``ds.layers.{i}.label_range`` (float32 (2, kv_heads, head_dim): each key channel's calibrated
[min; max]), and the manifest's "attention" section.
`take_calibration` / `install_from_manifest` are the loading side (`sparsify.load`).
"""
from __future__ import annotations

import torch

from sparsify.attention import ds_runtime
from sparsify.attention.double_sparsity import (RANGE, TENSOR, ChannelCalibration, DoubleSparsityConfig,
                                                attention_modules, label_ranges, rankings)
from sparsify.errors import UserError

METHOD = "double-sparsity"


class AttentionCalibration:
    """One prune run's Double Sparsity calibration (see the module docstring)."""

    def __init__(self, loaded, config: DoubleSparsityConfig):
        from sparsify.models.layout import find_blocks

        if loaded.family.name != "causal-lm":
            raise UserError(f"--attention double-sparsity applies to causal LMs (decoders with a KV cache); this model "
                            f"is a {loaded.family.name}: drop --attention")
        blocks = find_blocks(loaded.model)
        if len(blocks) != 1:
            raise UserError("--attention double-sparsity needs one list of decoder blocks: drop --attention")
        self.loaded, self.config, self.layers = loaded, config, blocks[0][1]
        for i, block in enumerate(self.layers):
            found = attention_modules(block)
            if len(found) == 1:
                config.channel_count(found[0][1].head_dim)  # a count above the head size fails before any work
            else:
                raise UserError(f"double sparsity: block {i} of this model has no attention module that goes through "
                                "transformers' attention interface (or several): this architecture is not supported; "
                                "drop --attention")
        self.calibration = ChannelCalibration(self.layers)

    @property
    def observers(self) -> dict:
        return {"double_sparsity": self.calibration.observer}

    def finish(self, calib, seq_len: int) -> tuple[dict, dict[str, torch.Tensor]]:
        """(manifest "attention" section, tensors to store) once the runner has seen every block."""
        cfg = self.config
        stats = self.calibration.stats
        self.calibration.check_complete(len(self.layers))
        selection = None
        statistic = cfg.statistic
        if statistic == "auto":
            from sparsify.attention.ds_select import choose

            statistic, selection = choose(self.loaded, stats, cfg, calib, seq_len)
        ranked = rankings(stats, statistic, cfg.seed)
        kv, d = ranked[0].shape
        model_cfg = self.loaded.model.config
        heads = getattr(model_cfg, "num_attention_heads", kv)
        section = {"method": METHOD, "config": cfg.to_json(), "statistic": statistic, "selection": selection,
                   "head_dim": d, "kv_heads": kv, "heads": heads, "blocks": len(self.layers),
                   "channels": cfg.channel_count(d),
                   "dense_blocks": list(range(min(cfg.dense_layers, len(self.layers)))),
                   "calibration_tokens": int(stats[0].tokens),
                   "tensors": TENSOR.format("{i}") + ": int16 (kv_heads, head_dim), channels most important first"}
        tensors = {TENSOR.format(i): r.to(torch.int16) for i, r in ranked.items()}
        if cfg.needs_ranges:
            section["tensors"] += "; " + RANGE.format("{i}") + ": float32 (2, kv_heads, head_dim), channel [min; max]"
            tensors.update({RANGE.format(i): r for i, r in label_ranges(stats).items()})
        return section, tensors


def kv_bytes_at(manifest: dict, context: int, itemsize: int = 2) -> dict:
    """`accounting.kv_bytes` of the artifact's attention section at ``context`` cached tokens."""
    from sparsify.attention.accounting import kv_bytes

    section = manifest["attention"]
    return kv_bytes(section, DoubleSparsityConfig.from_json(section["config"]), context, itemsize)


def take_calibration(manifest: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict | None] | None:
    """Pop Double Sparsity's tensors out of an artifact's tensors: ({block: (kv_heads, head_dim) int64 ranking},
    {block: (2, kv_heads, head_dim) channel range} or None), or None without an attention section."""
    section = manifest.get("attention")
    if not section:
        return None
    if section.get("method") != METHOD:
        raise UserError(f"unknown attention method {section.get('method')!r} in the manifest: upgrade sparsify")
    config = DoubleSparsityConfig.from_json(section["config"])
    blocks = range(section["blocks"])
    channels = {i: _take(tensors, TENSOR.format(i)).long() for i in blocks}
    ranges = {i: _take(tensors, RANGE.format(i)).float() for i in blocks} if config.needs_ranges else None
    return channels, ranges


def _take(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise UserError(f"the artifact lacks {name}: it is incomplete; re-run 'sparsify prune'")
    return tensors.pop(name)


def install_from_manifest(model, manifest: dict, calibration: tuple[dict, dict | None]) -> None:
    """Install Double Sparsity attention as the manifest describes it (``calibration`` from `take_calibration`)."""
    channels, ranges = calibration
    ds_runtime.install(model, channels, DoubleSparsityConfig.from_json(manifest["attention"]["config"]), ranges)
