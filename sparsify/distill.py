"""Sparse distillation after pruning (``--distill-steps N``): the dense model teaches the pruned one.

Loss per micro-batch: KL(teacher || student) on the output logits (or on the last hidden states'
mean-pooled embeddings for encoders and CLIP) plus ``feature_weight`` x the mean over blocks of the
normalised MSE between student and teacher hidden states. Only the targeted Linears' kept weights
train (AdamW, no weight decay): their gradients are multiplied by the mask, so Adam's moments and
updates at pruned positions stay exactly zero, and the mask is re-applied after every step. With
quantization the forward uses the fake-quantized weight (straight-through estimator, the packer's
fixed scales), and at the end every weight is snapped back onto its grid; a kept weight that would
round or train to exactly 0.0 is nudged to the nearest non-zero value so the mask never changes.
Memory: gradient checkpointing per block, micro-batches with gradient accumulation, optimizer
state only for the targeted weights. End-to-end only in this version (block-wise distillation for
models whose teacher and student do not fit together is not implemented).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from sparsify import progress
from sparsify.quant import rtn


class _FakeQuant(nn.Module):
    """Straight-through fake quantization with fixed params."""

    def __init__(self, params):
        super().__init__()
        self.params = params

    def forward(self, w):
        return w + (rtn.snap(w.detach(), self.params) - w).detach()


def _outputs(out):
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _loss(s_out, t_out, feature_weight: float) -> torch.Tensor:
    s, t = _outputs(s_out).float(), _outputs(t_out).float()
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
    feats = [F.mse_loss(a.float(), b.float()) / b.float().pow(2).mean().clamp(min=1e-8)
             for a, b in zip(s_out.hidden_states[1:], t_out.hidden_states[1:])]
    return kl + feature_weight * torch.stack(feats).mean()


def _finalize(flat, masks, qparams):
    """Snap onto the quantization grid, keep every kept weight non-zero, zero the pruned ones."""
    with torch.no_grad():
        for name, lin in flat.items():
            w, keep = lin.weight, masks[name]
            if qparams.get(name) is not None:
                p = qparams[name]
                q = rtn.snap(w, p)
                rows, cols = torch.meshgrid(torch.arange(w.shape[0]), torch.arange(w.shape[1]), indexing="ij")
                step, _ = rtn.expand_params(p, rows, cols, w.shape[1])
                q = torch.where(keep & (q == 0), torch.where(w >= 0, step, -step).to(w.dtype), q)
                q = rtn.snap(q, p)
            else:
                tiny = torch.finfo(w.dtype).tiny
                q = torch.where(keep & (w == 0), torch.full_like(w, tiny), w)
            w.copy_(torch.where(keep, q, torch.zeros((), dtype=w.dtype)))


def distill_model(loaded, flat: dict[str, nn.Linear], qparams: dict, config, source, *, lr: float = 1e-4,
                  feature_weight: float = 1.0, micro_batch: int = 2, samples_per_step: int = 4) -> dict:
    """Distill ``loaded.model`` (pruned in place) from the dense checkpoint at ``source``."""
    from sparsify.models.load import load_model
    from sparsify.pipeline import calibration_batches, peak_rss_mb

    t0 = time.perf_counter()
    teacher = load_model(source, dtype=str(loaded.dtype).removeprefix("torch."), device=config.device).model
    teacher.requires_grad_(False)
    student = loaded.model
    student.requires_grad_(False)
    masks = {name: lin.weight.detach() != 0 for name, lin in flat.items()}
    params = []
    for name, lin in flat.items():
        lin.weight.requires_grad_(True)
        lin.weight.register_hook(lambda g, keep=masks[name]: g * keep)
        params.append(lin.weight)
        if qparams.get(name) is not None:
            parametrize.register_parametrization(lin, "weight", _FakeQuant(qparams[name]))
    for m in student.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    student.train()
    if hasattr(student, "activation_checkpointing_enable"):
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batches = [{k: v[i:i + micro_batch].to(config.device) for k, v in b.items()}
               for b in calibration_batches(loaded, config.calib) for i in range(0, len(next(iter(b.values()))), micro_batch)]
    per_step = max(1, samples_per_step // micro_batch)  # gradient accumulation
    losses, cursor = [], 0
    with progress.bar("distilling", total=config.distill_steps) as advance:
        for _ in range(config.distill_steps):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(per_step):
                batch = batches[cursor % len(batches)]
                cursor += 1
                with torch.no_grad():
                    t_out = teacher(**batch, output_hidden_states=True)
                loss = _loss(student(**batch, output_hidden_states=True), t_out, feature_weight) / per_step
                loss.backward()
                total += loss.item()
            opt.step()
            with torch.no_grad():
                for name, lin in flat.items():
                    w = lin.parametrizations.weight.original if parametrize.is_parametrized(lin) else lin.weight
                    w.mul_(masks[name])
            losses.append(total)
            advance()
    for name, lin in flat.items():
        if parametrize.is_parametrized(lin):
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
        lin.weight.requires_grad_(False)
    (getattr(student, "activation_checkpointing_disable", None) or student.gradient_checkpointing_disable)()
    student.eval()
    _finalize(flat, masks, qparams)
    del teacher, opt
    return {"steps": config.distill_steps, "mode": "end-to-end", "lr": lr, "feature_weight": feature_weight,
            "samples_per_step": per_step * micro_batch, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1)}
