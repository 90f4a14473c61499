"""Agreement of a compressed model with its dense baseline on the same inputs.

Logit models (causal LM, classifier): mean per-position KL(baseline || model) and top-1 agreement.
Encoders: cosine of attention-mask-weighted mean-pooled last hidden states (sentence embeddings).
CLIP: cosine of image embeddings and of text embeddings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _logits(model, batch):
    return model(**batch).logits.float()


@torch.inference_mode()
def logit_agreement(model, baseline, batches: list[dict]) -> dict:
    kl_sum, same, count = 0.0, 0, 0
    for batch in batches:
        p, q = _logits(baseline, batch), _logits(model, batch)  # (..., classes)
        logp, logq = F.log_softmax(p, -1), F.log_softmax(q, -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # (...,)
        kl_sum += kl.sum().item()
        same += (p.argmax(-1) == q.argmax(-1)).sum().item()
        count += kl.numel()
    return {"kl": kl_sum / count, "top1": same / count, "positions": count}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(b, T, d), (b, T) -> (b, d), as sentence-transformers pools."""
    if mask is None:
        return hidden.mean(1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.inference_mode()
def embedding_cosine(model, baseline, batches: list[dict]) -> dict:
    cos = []
    for batch in batches:
        a = mean_pool(model(**batch).last_hidden_state.float(), batch.get("attention_mask"))
        b = mean_pool(baseline(**batch).last_hidden_state.float(), batch.get("attention_mask"))
        cos.append(F.cosine_similarity(a, b, dim=-1))
    return {"cosine": torch.cat(cos).mean().item(), "samples": sum(len(c) for c in cos)}


@torch.inference_mode()
def clip_cosine(model, baseline, batches: list[dict]) -> dict:
    img, txt = [], []
    for batch in batches:
        a, b = model(**batch), baseline(**batch)
        img.append(F.cosine_similarity(a.image_embeds.float(), b.image_embeds.float(), dim=-1))
        txt.append(F.cosine_similarity(a.text_embeds.float(), b.text_embeds.float(), dim=-1))
    return {"cosine": torch.cat(img + txt).mean().item(), "image_cosine": torch.cat(img).mean().item(),
            "text_cosine": torch.cat(txt).mean().item()}


BY_FAMILY = {"causal-lm": logit_agreement, "image-classifier": logit_agreement, "encoder": embedding_cosine,
             "clip": clip_cosine}
