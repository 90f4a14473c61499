"""End-to-end distillation: the dense teacher beside the student, ``steps`` optimizer steps over the
whole model, loss = the family's output loss (`_family_loss`) + ``feature_weight`` x the per-block
feature loss (`BlockRecorder` keeps both models' block outputs during their forwards). Every student
block is activation-checkpointed, so activations cost one block's worth plus each block's input."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparsify.calibrate.capture import hidden_of
from sparsify.distill.dense import load_teacher
from sparsify.distill.loss import chunked_kl, feature_loss, kl_logits
from sparsify.distill.train import masked_step, trainable


class BlockRecorder:
    """Keeps the output of every module in ``blocks`` (in call order) while ``on`` is True."""

    def __init__(self, blocks: list[nn.Module]):
        self.on, self.outputs = False, []
        self.handles = [b.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, _module, _inputs, out):
        if self.on:
            self.outputs.append(hidden_of(out))

    def take(self) -> list[torch.Tensor]:
        outs, self.outputs = self.outputs, []
        return outs

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.outputs = []


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


def run(loaded, flat, qparams, masks, micro, source, config, steps, lr, feature_weight, per_step,
        kl_chunk, advance) -> list[float]:
    """Train ``flat`` in place; returns the loss of every optimizer step."""
    from sparsify.models.layout import find_blocks

    student, teacher = loaded.model, load_teacher(loaded, source, config.device)
    s_blocks = [b for _, layers in find_blocks(student) for b in layers]
    t_rec, s_rec = BlockRecorder([b for _, layers in find_blocks(teacher) for b in layers]), BlockRecorder(s_blocks)
    losses = []
    try:
        with trainable(flat, qparams) as params, _checkpointed(s_blocks):
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
