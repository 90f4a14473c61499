"""Sparse distillation after pruning (``--distill-steps N``): the dense model teaches the pruned one.

Loss: causal LMs: KL(teacher || student) on the logits (chunked over tokens, `distill_loss.chunked_kl`)
+ ``feature_weight`` x the per-block feature loss (normalised MSE of every block's output); image
classifiers: KL on the class logits + feature loss; encoders and CLIP: the feature loss alone.
Data: the pruning run's calibration batches, split into micro-batches of ``micro_batch`` samples,
cycled; one optimizer step accumulates ``samples_per_step`` samples.

What trains: only the targeted Linears' weights (AdamW, no weight decay, per-tensor updates: no
model-sized temporaries); embeddings, norms and all other tensors are frozen, so optimizer state
exists for these alone. `distill_loss.masked_step` zeroes gradients at pruned positions before each
step and re-applies the mask after it. With quantization the forward sees each weight fake-quantized
with the packer's FIXED scales (straight-through estimator) and `distill_loss.finalize` snaps it back
onto its grid at exit, where a kept weight that is exactly 0.0 is nudged to the smallest non-zero
value of its entry sign (the grid step; unquantized: the dtype's smallest normal number), so
``weight != 0`` is exactly the entry mask.

Modes (``mode="auto"`` takes end-to-end when `estimate_end_to_end_bytes` fits in 80% of the memory
available on the device: psutil on CPU, ``cuda.mem_get_info`` on a GPU; else block-wise):
- ``end-to-end``: the dense teacher is loaded beside the student; every block of the student is
  activation-checkpointed; ``steps`` optimizer steps over the whole model.
- ``block-wise``: no second model. Blocks train one at a time, in order: block i's target is the same
  block with its dense weights read back from the checkpoint files (`DenseWeights`), applied to the teacher's own
  input chain; the student block learns to map the student's input (from the already distilled
  blocks) to it. ``steps`` optimizer steps per block, feature loss only (no logits exist mid-model).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import psutil
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from sparsify import progress
from sparsify.config import DISTILL_MODES as MODES
from sparsify.distill_loss import (BlockRecorder, DenseWeights, FakeQuant, PeakRss, chunked_kl, feature_loss,
                                   finalize, kl_logits, masked_step, normalized_mse, plain, run_block, with_hidden)
from sparsify.errors import UserError



def estimate_end_to_end_bytes(model: nn.Module, flat: dict[str, nn.Linear], config, tokens: int, kl_chunk: int) -> int:
    """Bytes end-to-end mode needs beyond the loaded student: the teacher's weights, gradient + two Adam
    moments of the trained weights, per block the checkpointed input and both models' recorded outputs,
    one block's recomputed internals and attention scores, and one chunk of logits (with softmax copies)."""
    c = getattr(config, "text_config", None) or config
    hidden, inter = getattr(c, "hidden_size", 768), getattr(c, "intermediate_size", 3072)
    blocks, heads = getattr(c, "num_hidden_layers", 12), getattr(c, "num_attention_heads", 12)
    vocab = getattr(c, "vocab_size", 0)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(lin.weight.numel() * lin.weight.element_size() for lin in flat.values())
    acts = tokens * 4 * (3 * blocks * hidden + 8 * hidden + 4 * inter)
    return weights + 3 * trained + acts + 2 * 4 * heads * tokens * min(tokens, 4096) + 6 * 4 * kl_chunk * vocab


def _tokens_per_sample(batch: dict, config) -> int:
    """Sequence length of a text batch (longest of its id tensors), plus image patches (+1 class token)."""
    text = max([v.shape[-1] for v in batch.values() if v.dim() == 2] or [0])
    vision = getattr(config, "vision_config", None) or config
    if "pixel_values" not in batch:
        return text
    return text + (getattr(vision, "image_size", 0) // getattr(vision, "patch_size", 1)) ** 2 + 1


def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return psutil.virtual_memory().available


@contextmanager
def _trainable(flat: dict[str, nn.Linear], qparams: dict):
    """Fake quantization attached where asked; yields the leaf weights that train, with requires_grad."""
    for name, lin in flat.items():
        if qparams.get(name) is not None:
            parametrize.register_parametrization(lin, "weight", FakeQuant(qparams[name], lin.in_features))
    params = [lin.parametrizations.weight.original if parametrize.is_parametrized(lin) else lin.weight
              for lin in flat.values()]
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        for p in params:
            p.requires_grad_(False)
        for lin in flat.values():
            if parametrize.is_parametrized(lin):
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)


@contextmanager
def _checkpointed(blocks: list[nn.Module]):
    """Activation checkpointing per block (works in eval mode, for any module), undone on exit."""
    own = [b.__dict__.get("forward") for b in blocks]  # an instance-level forward (e.g. from a hook library)
    for b in blocks:
        b.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(b.forward)
    try:
        yield
    finally:
        for b, f in zip(blocks, own):
            del b.forward
            if f is not None:
                b.forward = f


def _family_loss(loaded, student, teacher, batch, kl_chunk: int):
    """The family's output loss (None: feature loss only); runs both forwards (block hooks record)."""
    family = loaded.family.name
    if family == "causal-lm":
        with torch.no_grad():
            t_h = teacher.base_model(**batch, use_cache=False).last_hidden_state  # (b, T, hidden)
        s_h = student.base_model(**batch, use_cache=False).last_hidden_state  # (b, T, hidden)
        return chunked_kl(s_h, t_h, student.get_output_embeddings(), teacher.get_output_embeddings(),
                          batch.get("attention_mask"), kl_chunk)
    with torch.no_grad():
        t_out = teacher(**batch)
    s_out = student(**batch)
    if family == "image-classifier":
        return kl_logits(s_out.logits, t_out.logits) / s_out.logits.shape[0]
    return None


def _teacher(loaded, source, device: str) -> nn.Module:
    """The dense model, frozen, in the student's dtype."""
    from sparsify.models.load import load_model

    return load_model(source, dtype=str(loaded.dtype).removeprefix("torch."), device=device).model.requires_grad_(False)


def _end_to_end(loaded, flat, qparams, masks, micro, source, config, steps, lr, feature_weight, per_step,
                kl_chunk, advance) -> list[float]:
    from sparsify.models.layout import find_blocks

    student, teacher = loaded.model, _teacher(loaded, source, config.device)
    s_blocks = [b for _, layers in find_blocks(student) for b in layers]
    t_rec, s_rec = BlockRecorder([b for _, layers in find_blocks(teacher) for b in layers]), BlockRecorder(s_blocks)
    losses = []
    try:
        with _trainable(flat, qparams) as params, _checkpointed(s_blocks):
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False)
            keep = [masks[n] for n in flat]
            for step in range(steps):
                total = 0.0
                for j in range(per_step):
                    batch = micro[(step * per_step + j) % len(micro)]
                    t_rec.on = s_rec.on = True
                    out = _family_loss(loaded, student, teacher, batch, kl_chunk)
                    t_rec.on = s_rec.on = False
                    feat = feature_loss(s_rec.take(), t_rec.take())
                    loss = (feature_weight * feat if out is None else out + feature_weight * feat) / per_step
                    loss.backward()
                    total += loss.item()
                masked_step(opt, params, keep)
                losses.append(total)
                advance()
    finally:
        t_rec.remove()
        s_rec.remove()
    return losses


def _block_wise(loaded, flat, qparams, masks, signs, micro, source, config, steps, lr, per_step,
                advance) -> list[tuple[float, float]]:
    from sparsify.calibrate.runner import capture_inputs
    from sparsify.models.layout import find_blocks

    model, dev, losses = loaded.model, config.device, []
    dense = DenseWeights(source, list(flat), lambda: _teacher(loaded, source, "cpu"))
    for prefix, layers in find_blocks(model):
        cache, model.config.use_cache = getattr(model.config, "use_cache", None), False  # no KV cache in the kwargs
        try:
            s_in = [plain(x, "cpu") for x in capture_inputs(model, layers[0], micro, dev, "cpu")]
        finally:
            model.config.use_cache = cache
        t_in = s_in
        for i, block in enumerate(layers):
            mine = {n: lin for n, lin in flat.items() if n.startswith(f"{prefix}.{i}.")}
            pruned = {n: lin.weight.data for n, lin in mine.items()}
            for n, lin in mine.items():
                lin.weight.data = dense.get(n, lin.weight)
            with torch.no_grad():
                t_out = [run_block(block, x, dev).cpu() for x in t_in]  # dense block on the teacher chain
            for n, lin in mine.items():
                lin.weight.data = pruned[n]
            if mine:
                with _trainable(mine, qparams) as params:
                    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False)
                    keep, curve = [masks[n] for n in mine], []
                    for step in range(steps):
                        total = 0.0
                        for j in [(step * per_step + k) % len(micro) for k in range(per_step)]:
                            loss = normalized_mse(run_block(block, s_in[j], dev), t_out[j].to(dev)) / per_step
                            loss.backward()
                            total += loss.item()
                        masked_step(opt, params, keep)
                        curve.append(total)
                        advance()
                finalize(mine, masks, signs, qparams)
                losses.append((curve[0], curve[-1]) if curve else (0.0, 0.0))
            with torch.no_grad():
                s_in = [with_hidden(x, run_block(block, x, dev).cpu()) for x in s_in]
            t_in = [with_hidden(x, o) for x, o in zip(t_in, t_out)]
    return losses


def distill_model(loaded, flat: dict[str, nn.Linear], qparams: dict, config, source, *, lr: float = 1e-4,
                  feature_weight: float = 1.0, samples_per_step: int = 4, micro_batch: int = 2,
                  kl_chunk: int = 512, mode: str = "auto") -> dict:
    """Distill the pruned ``loaded.model`` (in place) from the dense checkpoint at ``source``.

    Args:
        flat: the pruned Linears by name; their mask (``weight != 0``) is exactly the same at exit.
        qparams: per name, the `QuantParams` the packer will use (fixed here), or None.
        config: the run's `PruneConfig` (``distill_steps``, ``calib``, ``device``).
        lr, feature_weight: AdamW learning rate; weight of the per-block feature loss.
        samples_per_step, micro_batch: samples per optimizer step, and per forward (gradients accumulate).
        kl_chunk: tokens per chunk of logits in the KL.
        mode: ``auto`` | ``end-to-end`` | ``block-wise`` (module docstring).
    Returns:
        JSON-able summary: steps, mode, lr, losses (first/last and per step; block-wise: per block),
        nudged weights, the memory estimate, wall and CPU seconds, peak RSS sampled while distilling.
    """
    from sparsify.models.layout import find_blocks
    from sparsify.pipeline import calibration_batches, peak_rss_mb

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
    tokens = micro_batch * _tokens_per_sample(micro[0], loaded.config)
    need = estimate_end_to_end_bytes(loaded.model, flat, loaded.config, tokens, kl_chunk)
    have = available_bytes(config.device)
    if mode == "auto":
        mode = "end-to-end" if need <= 0.8 * have else "block-wise"
    masks = {n: lin.weight.detach() != 0 for n, lin in flat.items()}
    signs = {n: torch.sign(lin.weight.detach()).to(torch.int8) for n, lin in flat.items()}
    grads = {n: p.requires_grad for n, p in loaded.model.named_parameters()}
    loaded.model.requires_grad_(False)
    n_blocks = sum(any(n.startswith(f"{prefix}.{i}.") for n in flat)
                   for prefix, layers in find_blocks(loaded.model) for i in range(len(layers)))
    try:
        total = steps * (n_blocks if mode == "block-wise" else 1)
        with PeakRss() as rss, progress.bar(f"distilling ({mode})", total=total) as advance:
            if mode == "end-to-end":
                curve = _end_to_end(loaded, flat, qparams, masks, micro, source, config, steps, lr, feature_weight,
                                    per_step, kl_chunk, advance)
                first, last = curve[0], curve[-1]
            else:
                curve = _block_wise(loaded, flat, qparams, masks, signs, micro, source, config, steps, lr, per_step,
                                    advance)
                first, last = (sum(c[k] for c in curve) / max(1, len(curve)) for k in (0, 1))
            nudged = finalize(flat, masks, signs, qparams)
    finally:
        for n, p in loaded.model.named_parameters():
            p.requires_grad_(grads.get(n, False))
    return {"steps": steps, "mode": mode, "lr": lr, "feature_weight": feature_weight if mode == "end-to-end" else None,
            "samples_per_step": per_step * micro_batch, "micro_batch": micro_batch,
            "loss_first": round(first, 6), "loss_last": round(last, 6),
            "losses": ([round(x, 6) for x in curve] if mode == "end-to-end"
                       else [[round(a, 6), round(b, 6)] for a, b in curve]),  # block-wise: (first, last) per block
            "nudged": nudged, "memory_estimate_mb": round(need / 2**20), "memory_available_mb": round(have / 2**20),
            "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
            "peak_rss_mb": rss.peak_mb,
            "process_peak_rss_mb": round(peak_rss_mb(), 1)}
