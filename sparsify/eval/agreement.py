"""Agreement of a compressed model with its dense baseline on the same inputs.

What "agreement" means depends on what the model outputs, so each family maps to one function
(`BY_FAMILY`):
- logit models (causal LM, image classifier): mean KL(baseline || model) per position and the
  fraction of positions whose argmax is the same (top-1 agreement). Padded text positions
  (attention_mask 0) are not counted.
- encoders and image encoders: cosine of sentence (image) embeddings, i.e. the base model's last
  hidden states mean-pooled over the real (attention-mask 1) tokens (all patches for images), as
  sentence-transformers pools them. A checkpoint with a head (XLM-R's masked-LM head) is compared
  on its encoder's output: the head is not pruned, and a vocabulary-sized output says less.
- image-text dual encoders (CLIP, SigLIP): cosine of the image embeddings and of the text embeddings
  (their mean is ``cosine``).
All sums run in float32 whatever the models' dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _position_weights(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """1 for each position that counts: mask over tokens for (b, T, V) logits, all ones for (b, V)."""
    mask = batch.get("attention_mask")
    if logits.ndim == 3 and mask is not None:
        return mask.to(logits.device, torch.float32)  # (b, T)
    return torch.ones(logits.shape[:-1], device=logits.device)  # (b,) or (b, T)


@torch.inference_mode()
def logit_agreement(model, baseline, batches: list[dict]) -> dict:
    """Mean per-position KL(baseline || model) and top-1 agreement of the ``.logits`` outputs.

    Returns:
        {"kl": mean KL in nats, "top1": fraction with the same argmax, "positions": positions counted}.
    """
    kl_sum, same, count = 0.0, 0.0, 0.0
    for batch in batches:
        p = baseline(**batch).logits.float()  # (b, T, V) or (b, V)
        q = model(**batch).logits.float().to(p.device)  # same shape
        w = _position_weights(p, batch)  # (b, T) or (b,)
        logp, logq = F.log_softmax(p, -1), F.log_softmax(q, -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # (b, T) or (b,): KL(p || q) per position
        kl_sum += (kl * w).sum().item()
        same += ((p.argmax(-1) == q.argmax(-1)).float() * w).sum().item()
        count += w.sum().item()
    count = max(count, 1.0)
    return {"kl": kl_sum / count, "top1": same / count, "positions": int(count)}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(b, T, d) hidden states, (b, T) attention mask -> (b, d) mean over the masked-in tokens."""
    if mask is None:
        return hidden.mean(1)  # (b, d)
    m = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)  # (b, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (b, d)


def last_hidden(model, batch: dict) -> torch.Tensor:
    """(b, T, d) final hidden states of the model's encoder: ``base_model`` drops any head; a model that
    is no transformers model (ONNX) outputs ``last_hidden_state`` itself."""
    return getattr(model, "base_model", model)(**batch).last_hidden_state


@torch.inference_mode()
def embedding_cosine(model, baseline, batches: list[dict]) -> dict:
    """Mean cosine between the two models' mean-pooled sentence embeddings.

    Returns:
        {"cosine": mean over samples, "min_cosine": the worst sample, "samples": count}.
    """
    cos = []
    for batch in batches:
        mask = batch.get("attention_mask")
        a = mean_pool(last_hidden(model, batch).float(), mask)  # (b, d)
        b = mean_pool(last_hidden(baseline, batch).float(), mask).to(a.device)  # (b, d)
        cos.append(F.cosine_similarity(a, b, dim=-1).cpu())  # (b,)
    cos = torch.cat(cos)
    return {"cosine": cos.mean().item(), "min_cosine": cos.min().item(), "samples": cos.numel()}


@torch.inference_mode()
def clip_cosine(model, baseline, batches: list[dict]) -> dict:
    """Cosine of CLIP's ``image_embeds`` and of its ``text_embeds`` with the baseline's.

    Returns:
        {"cosine": mean of both, "image_cosine", "text_cosine", "samples": image-text pairs}.
    """
    img, txt = [], []
    for batch in batches:
        a, b = model(**batch), baseline(**batch)
        img.append(F.cosine_similarity(a.image_embeds.float(), b.image_embeds.float(), dim=-1).cpu())  # (b,)
        txt.append(F.cosine_similarity(a.text_embeds.float(), b.text_embeds.float(), dim=-1).cpu())  # (b,)
    img, txt = torch.cat(img), torch.cat(txt)
    return {"cosine": torch.cat([img, txt]).mean().item(), "image_cosine": img.mean().item(),
            "text_cosine": txt.mean().item(), "samples": img.numel()}


BY_FAMILY = {"causal-lm": logit_agreement, "image-classifier": logit_agreement, "encoder": embedding_cosine,
             "image-encoder": embedding_cosine, "clip": clip_cosine}
