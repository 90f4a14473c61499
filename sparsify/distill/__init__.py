"""Sparse distillation after pruning (``--distill-steps N``): the dense model teaches the pruned one.

Loss (`loss`): causal LMs: KL(teacher || student) on the logits (chunked over tokens, `loss.chunked_kl`)
+ ``feature_weight`` x the per-block feature loss (normalised MSE of every block's output); image
classifiers: KL on the class logits + feature loss; encoders and CLIP: the feature loss alone.
Data: the pruning run's calibration batches, split into micro-batches of ``micro_batch`` samples,
cycled; one optimizer step accumulates ``samples_per_step`` samples.

What trains: only the targeted Linears' weights (AdamW, no weight decay, per-tensor updates: no
model-sized temporaries); embeddings, norms and all other tensors are frozen, so optimizer state
exists for these alone. `train.masked_step` zeroes gradients at pruned positions before each
step and re-applies the mask after it. Quantization enters in one of two ways (``--distill-quant``):
- ``after`` (default; the caller passes ``specs``): the weights were pruned in float and train in
  float; at exit `train.refit` fits round-to-nearest scales to the trained weights. Measured on
  SmolLM2 2:4 (README): 61.68 against 61.70 unquantized, where ``fixed`` gave 68.86 (+11.6%).
- ``fixed`` (``qparams`` from a quantizing pruner): the forward sees each weight fake-quantized with
  the pruner's FIXED scales (straight-through estimator).
Either way `train.finalize` snaps each weight onto its grid at exit, where a kept weight that is
exactly 0.0 is nudged to the smallest non-zero value of its entry sign (the grid step; unquantized:
the dtype's smallest normal number), so ``weight != 0`` is exactly the entry mask.

Modes (``mode="auto"`` takes end-to-end when `budget.estimate_end_to_end_bytes` fits in 80% of the
memory available on the device, `sparsify.resources.available_bytes`; else block-wise):
- ``end-to-end`` (`end_to_end`): the dense teacher is loaded beside the student; every block of the
  student is activation-checkpointed; ``steps`` optimizer steps over the whole model.
- ``block-wise`` (`block_wise`): no second model. Blocks train one at a time, in order, each against
  itself with its dense weights (read back from the checkpoint files) on the teacher's input chain;
  ``steps`` optimizer steps per block, feature loss only (no logits exist mid-model).

Modules: `loss` (the losses), `train` (what trains; masked steps; fake quantization; the exit snap),
`blocks` (recording and running single blocks), `dense` (teacher model, dense weights from the files),
`budget` (end-to-end memory estimate), `end_to_end` and `block_wise` (the two loops).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from sparsify import progress
from sparsify.calibrate.batches import calibration_batches
from sparsify.config import DISTILL_MODES as MODES
from sparsify.distill import block_wise, end_to_end
from sparsify.distill.budget import estimate_end_to_end_bytes, tokens_per_sample
from sparsify.distill.train import finalize, refit
from sparsify.errors import UserError
from sparsify.resources import PeakRss, available_bytes, peak_rss_mb

__all__ = ["MODES", "distill_model", "estimate_end_to_end_bytes"]


def distill_model(loaded, flat: dict[str, nn.Linear], qparams: dict, config, source, *, lr: float = 1e-4,
                  feature_weight: float = 1.0, samples_per_step: int = 4, micro_batch: int = 2,
                  kl_chunk: int = 512, mode: str = "auto", specs: dict | None = None) -> dict:
    """Distill the pruned ``loaded.model`` (in place) from the dense checkpoint at ``source``.

    Args:
        flat: the pruned Linears by name; their mask (``weight != 0``) is exactly the same at exit.
        qparams: per name, the `QuantParams` the packer will use (trained through, fixed), or None; with
            ``specs``, filled in place with the scales fitted after training.
        config: the run's `PruneConfig` (``distill_steps``, ``calib``, ``device``).
        lr, feature_weight: AdamW learning rate; weight of the per-block feature loss.
        samples_per_step, micro_batch: samples per optimizer step, and per forward (gradients accumulate).
        kl_chunk: tokens per chunk of logits in the KL.
        mode: ``auto`` | ``end-to-end`` | ``block-wise`` (module docstring).
        specs: per name, the `QuantSpec` to round to after training (None: not quantized), for weights
            pruned in float (module docstring: ``after``); None: ``qparams`` are fixed.
    Returns:
        JSON-able summary: steps, mode, lr, losses (first/last and per step; block-wise: per block),
        nudged weights, the memory estimate, wall and CPU seconds, peak RSS sampled while distilling.
    """
    from sparsify.models.layout import find_blocks

    steps = int(config.distill_steps or 0)
    if steps <= 0:
        return {"steps": 0, "mode": None}
    if mode not in MODES:
        raise UserError(f"distill mode {mode!r}: use one of {', '.join(MODES)}")
    t0, c0 = time.perf_counter(), time.process_time()
    batches = calibration_batches(loaded, config.calib)
    micro = [{k: v[i:i + micro_batch].to(config.device) for k, v in b.items()}
             for b in batches for i in range(0, len(next(iter(b.values()))), micro_batch)]
    per_step = max(1, samples_per_step // micro_batch)
    tokens = micro_batch * tokens_per_sample(micro[0], loaded.config)
    need = estimate_end_to_end_bytes(loaded.model, flat, loaded.config, tokens, kl_chunk)
    have = available_bytes(config.device)
    if mode == "auto":
        mode = "end-to-end" if need <= 0.8 * have else "block-wise"
    masks = {n: lin.weight.detach() != 0 for n, lin in flat.items()}
    signs = {n: torch.sign(lin.weight.detach()).to(torch.int8) for n, lin in flat.items()}
    grads = {n: p.requires_grad for n, p in loaded.model.named_parameters()}
    loaded.model.requires_grad_(False)
    grids = {} if specs is not None else qparams  # what the forward fake-quantizes through while training
    settled: dict[str, int] = {}  # name -> kept weights nudged off 0.0

    def settle(mods: dict[str, nn.Linear]) -> None:  # trained weights onto their final grid, entry mask exact
        mods = {n: lin for n, lin in mods.items() if n not in settled}  # block-wise settles each block once
        if specs is not None:
            refit(mods, specs, qparams)
        settled.update({n: finalize({n: lin}, masks, signs, qparams) for n, lin in mods.items()})

    n_blocks = sum(any(n.startswith(f"{prefix}.{i}.") for n in flat)
                   for prefix, layers in find_blocks(loaded.model) for i in range(len(layers)))
    try:
        total = steps * (n_blocks if mode == "block-wise" else 1)
        with PeakRss() as rss, progress.bar(f"distilling ({mode})", total=total) as advance:
            if mode == "end-to-end":
                curve = end_to_end.run(loaded, flat, grids, masks, micro, source, config, steps, lr,
                                       feature_weight, per_step, kl_chunk, advance)
                first, last = curve[0], curve[-1]
            else:
                curve = block_wise.run(loaded, flat, grids, masks, settle, micro, source, config, steps, lr,
                                       per_step, advance)
                first, last = (sum(c[k] for c in curve) / max(1, len(curve)) for k in (0, 1))
            settle(flat)
    finally:
        for n, p in loaded.model.named_parameters():
            p.requires_grad_(grads.get(n, False))
    quant = None if not any(qparams.values()) else "after" if specs is not None else "fixed"
    return {"steps": steps, "mode": mode, "lr": lr, "quant": quant,
            "feature_weight": feature_weight if mode == "end-to-end" else None,
            "samples_per_step": per_step * micro_batch, "micro_batch": micro_batch,
            "loss_first": round(first, 6), "loss_last": round(last, 6),
            "losses": ([round(x, 6) for x in curve] if mode == "end-to-end"
                       else [[round(a, 6), round(b, 6)] for a, b in curve]),  # block-wise: (first, last) per block
            "nudged": sum(settled.values()), "memory_estimate_mb": round(need / 2**20), "memory_available_mb": round(have / 2**20),
            "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
            "peak_rss_mb": rss.peak_mb,
            "process_peak_rss_mb": round(peak_rss_mb(), 1)}
