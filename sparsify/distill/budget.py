"""How much memory end-to-end distillation needs, so that ``mode="auto"`` can pick it only where it fits.

End-to-end holds a second (teacher) model, optimizer state and checkpointed activations; block-wise
holds one block's worth. `estimate_end_to_end_bytes` is compared with the device's free memory
(`sparsify.resources.available_bytes`) by `sparsify.distill.distill_model`.
"""
from __future__ import annotations

from torch import nn


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


def tokens_per_sample(batch: dict, config) -> int:
    """Sequence length of a text batch (longest of its id tensors), plus image patches (+1 class token)."""
    text = max([v.shape[-1] for v in batch.values() if v.dim() == 2] or [0])
    vision = getattr(config, "vision_config", None) or config
    if "pixel_values" not in batch:
        return text
    return text + (getattr(vision, "image_size", 0) // getattr(vision, "patch_size", 1)) ** 2 + 1
