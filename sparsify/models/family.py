"""Model families: which inputs a model takes and which transformers auto class builds it.

A plain dict maps ``config.model_type`` to its family; nothing else in sparsify branches on the
architecture (blocks and Linears are found generically by `sparsify.models.layout`).
"""
from __future__ import annotations

from dataclasses import dataclass

from sparsify.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str  # causal-lm | encoder | image-classifier | clip
    inputs: str  # text | image | image-text
    auto_class: str  # transformers class used to build / load it


CAUSAL_LM = Family("causal-lm", "text", "AutoModelForCausalLM")
ENCODER = Family("encoder", "text", "AutoModel")
IMAGE_CLASSIFIER = Family("image-classifier", "image", "AutoModelForImageClassification")
CLIP = Family("clip", "image-text", "CLIPModel")

MODEL_TYPES: dict[str, Family] = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3"], CAUSAL_LM),
    **dict.fromkeys(["bert", "roberta", "distilbert"], ENCODER),
    **dict.fromkeys(["vit", "deit"], IMAGE_CLASSIFIER),
    "clip": CLIP,
}


def family_of(config) -> Family:
    """The family of a transformers config, by its ``model_type``; unknown types are a UserError."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        supported = ", ".join(sorted(MODEL_TYPES))
        raise UserError(f"unsupported architecture '{model_type}': sparsify supports {supported}")
    return MODEL_TYPES[model_type]
