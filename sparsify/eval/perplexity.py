"""Perplexity of a causal LM over non-overlapping windows of held-out text."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress=None) -> dict:
    """Mean next-token NLL over every predicted token (T-1 per window); ppl = exp(mean NLL).

    Args:
        windows: (n, T) token ids, one independent context each (no stride overlap).
        progress: optional callable(advance) called with the windows done per batch.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)  # (b, T)
        logits = model(input_ids=chunk).logits[:, :-1].float()  # (b, T-1, vocab)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += chunk[:, 1:].numel()
        if progress:
            progress(len(chunk))
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "windows": len(windows),
            "seq_len": windows.shape[1]}
