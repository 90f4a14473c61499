"""Perplexity of a causal LM over non-overlapping windows of held-out text.

Each window is an independent context (no stride overlap, no carried-over state), so a window of
T tokens predicts T-1 of them: token t+1 from tokens 0..t. The reported NLL is the mean over every
predicted token of every window, and perplexity = exp(mean NLL). Callers record the data source,
split and window length beside the number (METHODS.md: the protocol changes the number).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparsify.errors import UserError


def _device(model) -> torch.device:
    """Where the model's weights (or, for a packed model, its buffers) live; CPU when it has none."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _check(windows: torch.Tensor) -> None:
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise UserError(f"perplexity needs (windows, tokens) ids with at least 2 tokens each, got shape "
                        f"{tuple(windows.shape)}: raise --seq-len or pass more text")


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress=None) -> dict:
    """Mean next-token NLL over every predicted token (T-1 per window); ppl = exp(mean NLL).

    Args:
        model: a causal LM whose forward takes ``input_ids`` and returns ``.logits`` (b, T, vocab).
        windows: (n, T) token ids, one independent context each.
        batch_size: windows per forward.
        progress: optional callable(advance: int), called with the number of windows done per batch.

    Returns:
        {"perplexity", "nll", "tokens" (predicted tokens, n*(T-1)), "windows", "seq_len"}.
    """
    _check(windows)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: pass a positive number of windows per forward")
    device = _device(model)
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        ids = chunk.to(device=device, dtype=torch.long)  # (b, T)
        logits = model(input_ids=ids).logits  # (b, T, vocab)
        for row, seq in zip(logits, ids):  # one window at a time: a (T-1, vocab) log-softmax, not b of them
            total += F.cross_entropy(row[:-1].float(), seq[1:], reduction="sum").item()  # row[:-1]: (T-1, vocab)
        count += ids[:, 1:].numel()
        del logits
        if progress is not None:
            progress(len(chunk))
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1])}
