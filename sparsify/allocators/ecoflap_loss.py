"""The loss each model family is scored with by ECoFLaP (`sparsify.allocators.ecoflap`).

An `Objective` runs the model on a batch and returns one loss per *unit*: a row slice of the batch.
Row-separable losses (``per_row``) score one calibration sample per unit; a contrastive image-text
loss needs the whole batch as one unit.

  causal-lm         next-token cross-entropy (mean over the row's attended tokens)
  clip              symmetric image-text contrastive cross-entropy over the unit, with the model's
                    own logit scale; pairs the dense model cannot tell from the matched pair (within TIE
                    logits: duplicate captions) count as positives, not as errors
  image-classifier  cross-entropy on ``labels`` when the batch has them, else on the dense model's
                    top-1 class (the hard-target form of "KL to the dense outputs": KL to itself has a
                    zero gradient at the dense weights, so it cannot rank anything)
  encoder,          InfoNCE of the row's mean-pooled embedding against the dense embeddings of its
  image-encoder     batch (cosine similarity / 0.05, target: its own dense embedding). The plain
                    cosine distance to the dense embedding is zero with a zero gradient at the dense
                    weights; its contrastive form is not, and still measures how far the embedding moves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsify.errors import UserError
from sparsify.tensors import to_device

TAU = 0.05  # temperature of the encoders' InfoNCE
TIE = 1.0  # CLIP: a pair within this many dense logits of the matched pair is a positive (a duplicate caption)


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _rows(batch: dict, rows: list[int] | torch.Tensor) -> dict:
    idx = torch.as_tensor(rows, dtype=torch.long)
    return {k: v[idx] if torch.is_tensor(v) and v.dim() else v for k, v in batch.items()}


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least (half precision widened; float64 kept, so float64 checks stay exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _embedding(out, batch: dict) -> torch.Tensor:
    """(rows, d) mean of the last hidden states over attended positions."""
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = out.hidden_states[-1]
    h = h.float()
    if h.dim() == 2:
        return h
    mask = batch.get("attention_mask")
    if mask is None or mask.shape[:2] != h.shape[:2]:
        return h.mean(1)
    m = mask.to(h.dtype).unsqueeze(-1)  # (rows, T, 1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


class Objective:
    """``forward(model, batch)`` -> outputs; ``losses(out, batch, ref, slices, rows)`` -> one loss per slice.

    ``ref`` is what ``reference(model, batch)`` computed on the dense model for the whole original
    batch; ``rows`` maps each row of ``batch`` to its row in that original batch.
    """

    per_row = True
    needs_reference = False

    def forward(self, model, batch: dict):
        return model(**_model_inputs(batch))

    def reference(self, model, batch: dict):
        return None

    def row_losses(self, out, batch: dict, ref, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def losses(self, out, batch: dict, ref, slices: list[tuple[int, int]], rows: torch.Tensor) -> torch.Tensor:
        per_row = self.row_losses(out, batch, ref, rows)  # (rows,)
        return torch.stack([per_row[a:b].mean() for a, b in slices])


class NextToken(Objective):
    def row_losses(self, out, batch, ref, rows):
        logits = out.logits[:, :-1]  # (rows, T-1, V)
        labels = batch["input_ids"][:, 1:].to(logits.device)
        mask = batch.get("attention_mask")
        mask = torch.ones_like(labels) if mask is None else mask[:, 1:].to(logits.device)
        losses = []
        for i in range(logits.shape[0]):  # one row at a time: the (T, V) log-softmax is the big tensor
            ce = F.cross_entropy(logits[i].float(), labels[i], reduction="none")  # (T-1,)
            losses.append((ce * mask[i]).sum() / mask[i].sum().clamp_min(1))
        return torch.stack(losses)


class Contrastive(Objective):
    """Symmetric image-text InfoNCE over a unit (a batch), the model's own logit scale, dense ties as positives.

    A caption that the dense model scores within ``TIE`` logits of an image's own caption is a positive for
    that image too (and likewise an image for a caption); the target is uniform over the positives. With
    unique captions this is the plain CLIP loss. With duplicates ("a handwritten 7" beside "the number
    seven"; class captions), the plain loss would ask the model to tell apart what it was trained to make
    equal: its gradient then measures that impossible task instead of how much the weights matter, and
    the allocation follows it.
    """

    per_row = False
    needs_reference = True
    scale = None  # the model's exp(logit_scale), read at each forward

    def forward(self, model, batch):
        ls = getattr(model, "logit_scale", None)
        self.scale = _wide(ls.exp()) if ls is not None else None
        return model(**_model_inputs(batch), return_loss=False)

    def logits(self, out) -> torch.Tensor:
        img = F.normalize(_wide(out.image_embeds), dim=-1)
        txt = F.normalize(_wide(out.text_embeds), dim=-1)
        return (self.scale if self.scale is not None else 1.0) * img @ txt.T  # (images, captions)

    def reference(self, model, batch):
        with torch.no_grad():
            return self.logits(self.forward(model, batch)).detach().cpu()  # (B, B) dense logits

    def losses(self, out, batch, ref, slices, rows):
        logits = self.logits(out)
        result = []
        for a, b in slices:
            r = rows[a:b]
            dense = ref[r][:, r].to(logits.device)  # (n, n)
            own = dense.diagonal()
            to_text = (dense >= own[:, None] - TIE).float()  # (n, n) image i -> its positive captions
            to_image = (dense.T >= own[:, None] - TIE).float()  # caption j -> its positive images
            part = logits[a:b, a:b]
            result.append((F.cross_entropy(part, to_text / to_text.sum(1, keepdim=True))
                           + F.cross_entropy(part.T, to_image / to_image.sum(1, keepdim=True))) / 2)
        return torch.stack(result)


class Classification(Objective):
    needs_reference = True

    def reference(self, model, batch):
        if "labels" in batch:
            return batch["labels"]
        with torch.no_grad():
            return model(**_model_inputs(batch)).logits.argmax(-1).cpu()  # (B,)

    def row_losses(self, out, batch, ref, rows):
        target = ref[rows].to(out.logits.device)
        return F.cross_entropy(out.logits.float(), target, reduction="none")


class Embedding(Objective):
    needs_reference = True

    def forward(self, model, batch):
        return model(**_model_inputs(batch), output_hidden_states=True)

    def reference(self, model, batch):
        with torch.no_grad():
            return F.normalize(_embedding(self.forward(model, batch), batch), dim=-1).cpu()  # (B, d)

    def row_losses(self, out, batch, ref, rows):
        e = F.normalize(_embedding(out, batch), dim=-1)  # (rows, d)
        logits = e @ ref.to(e.device).T / TAU  # (rows, B)
        return F.cross_entropy(logits, rows.to(e.device), reduction="none")


OBJECTIVES = {"causal-lm": NextToken, "clip": Contrastive, "image-classifier": Classification,
              "encoder": Embedding, "image-encoder": Embedding}


def objective_for(family: str) -> Objective:
    if family not in OBJECTIVES:
        raise UserError(f"--allocation ecoflap has no loss for the {family or 'unknown'} family: "
                        f"use one of {', '.join(OBJECTIVES)}, or --allocation owl")
    return OBJECTIVES[family]()


def units_of(objective: Objective, batches: list[dict]) -> list[tuple[int, list[int]]]:
    """[(batch index, rows)] in order: one row each for row-separable losses, else the whole batch."""
    units = []
    for b, batch in enumerate(batches):
        n = next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim())
        units += [(b, [r]) for r in range(n)] if objective.per_row else [(b, list(range(n)))]
    return units


def unit_loss(model, objective: Objective, batch: dict, ref, rows: list[int], device) -> torch.Tensor:
    """The loss of one unit, run on its own (the naive reference path and the first-order pass)."""
    sub = to_device(_rows(batch, rows), device)
    out = objective.forward(model, sub)
    return objective.losses(out, sub, ref, [(0, len(rows))], torch.as_tensor(rows))[0]
