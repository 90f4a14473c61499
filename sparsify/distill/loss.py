"""The losses of sparse distillation (`sparsify.distill`).

- `chunked_kl`: KL(teacher || student) over the vocabulary, computed from the final hidden states a
  chunk of tokens at a time with its gradient formed on the spot, so that neither model's full
  (tokens, vocab) logits ever exist (SmolLM2 at 4 x 512 tokens: 400 MB per copy in float32).
- `kl_logits`: the same on (rows, classes) logits that exist anyway (image classifiers).
- `feature_loss`: the per-block feature loss, each block's output MSE divided by the teacher
  output's mean square (scale-free across blocks whose activations differ by orders of magnitude).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kl_logits(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Summed KL(teacher || student) over rows of (rows, classes) logits, in float32."""
    s, t = F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1)  # (rows, classes)
    return F.kl_div(s, t, log_target=True, reduction="sum")


class _HeadKL(torch.autograd.Function):
    """Summed KL(teacher || student) of the logits ``head(hidden)``, chunk by chunk. The gradient w.r.t.
    the student's hidden states, (softmax(z_s) - softmax(z_t)) @ W_head, is formed in the forward and
    kept ((tokens, hidden): small), so no (chunk, vocab) tensor outlives its chunk and the frozen heads
    run 3 matmuls per chunk instead of 6 (forward, checkpoint recompute, backward)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, s_head: nn.Module, t_head: nn.Module, chunk: int):
        total, grad, w = s.new_zeros((), dtype=torch.float32), torch.empty_like(s), s_head.weight  # w: (vocab, hidden)
        for i in range(0, s.shape[0], chunk):
            log_s = F.log_softmax(s_head(s[i:i + chunk]).float(), -1)  # (chunk, vocab)
            log_t = F.log_softmax(t_head(t[i:i + chunk]).float(), -1)  # (chunk, vocab)
            p_t = log_t.exp()
            total += (p_t * (log_t - log_s)).sum()
            grad[i:i + chunk] = ((log_s.exp() - p_t).to(w.dtype) @ w).to(s.dtype)  # (chunk, hidden)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return g * grad, None, None, None, None


def chunked_kl(s_hidden: torch.Tensor, t_hidden: torch.Tensor, s_head: nn.Module, t_head: nn.Module,
               mask: torch.Tensor | None = None, chunk: int = 512) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of the logits ``head(hidden)``, ``chunk`` tokens at a time
    (`_HeadKL`; the heads are frozen: no gradient reaches their weights).

    Args:
        s_hidden, t_hidden: (batch, T, hidden) final hidden states of student and teacher.
        s_head, t_head: the output projections (``get_output_embeddings()``).
        mask: (batch, T) attention mask; padded positions do not count.
    """
    keep = mask.bool() if mask is not None else torch.ones(s_hidden.shape[:2], dtype=torch.bool, device=s_hidden.device)
    s, t = s_hidden[keep], t_hidden[keep]  # (tokens, hidden)
    return _HeadKL.apply(s, t.detach(), s_head, t_head, chunk) / max(1, s.shape[0])


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """||s - t||^2 / ||t||^2 (both as means), float32."""
    t = teacher.float()
    return F.mse_loss(student.float(), t) / t.pow(2).mean().clamp(min=1e-12)


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of the normalised MSE between matching block outputs."""
    if len(student) != len(teacher) or not student:
        raise RuntimeError(f"recorded {len(student)} student and {len(teacher)} teacher block outputs")
    return torch.stack([normalized_mse(s, t) for s, t in zip(student, teacher)]).mean()

