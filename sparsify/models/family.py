"""Model families: which inputs a model takes and which transformers class builds it.

The family is read from transformers' own auto tables (``transformers.models.auto.modeling_auto``,
the ``*_MAPPING_NAMES`` dicts), never from a list of supported architectures, so a new transformers
release brings its new architectures for free:

  clip              image-text  zero-shot image classification (dual encoders: CLIP, SigLIP, ALIGN, ...)
  encoder           text        masked LM, text encoding, sequence classification (BERT, XLM-R, T5 encoder)
  causal-lm         text        causal LM (Llama, GPT-2, OPT, Falcon, Mixtral, Gemma-2, ...)
  image-classifier  image       image classification (ViT, DeiT, BEiT, ...)
  image-encoder     image       image feature extraction: vision backbones (DINOv2, ViTModel, ...)
and a base model (``MODEL_MAPPING_NAMES``: LlamaModel, CLIPVisionModel) is an encoder of its inputs.

``config.architectures[0]``, when transformers has that class, is looked up among the tables' class
names, and the model is built with that very class, so heads (a classifier, an MLM head) are kept.
Without it (a bare config, or custom code) ``model_type`` is looked up among the tables' keys in the
order above, then a config with both ``vision_config`` and ``text_config`` counts as a dual encoder,
and the family's auto class builds the model. Anything else (sequence-to-sequence, speech,
vision-language generation) is a one-line `UserError`. Nothing else in sparsify branches on the
architecture: blocks and prunable matrices are found generically by `sparsify.models.layout`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from sparsify.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str  # causal-lm | encoder | image-classifier | image-encoder | clip
    inputs: str  # text | image | image-text
    auto_class: str  # transformers class used to build / load it: the checkpoint's own class, else an auto class


CAUSAL_LM = Family("causal-lm", "text", "AutoModelForCausalLM")
ENCODER = Family("encoder", "text", "AutoModel")
IMAGE_CLASSIFIER = Family("image-classifier", "image", "AutoModelForImageClassification")
IMAGE_ENCODER = Family("image-encoder", "image", "AutoModel")
CLIP = Family("clip", "image-text", "AutoModel")

# (family, table) in lookup order; a table is ``MODEL_FOR_<table>_MAPPING_NAMES``. Class names are
# unique to one head table, so the order only matters for model types ("bert" has a masked-LM and a
# causal-LM class: it is an encoder; "vit" a classifier and a backbone: a classifier).
TABLES = [(CLIP, "ZERO_SHOT_IMAGE_CLASSIFICATION"), (ENCODER, "MASKED_LM"), (ENCODER, "TEXT_ENCODING"),
          (CAUSAL_LM, "CAUSAL_LM"), (IMAGE_CLASSIFIER, "IMAGE_CLASSIFICATION"),
          (ENCODER, "SEQUENCE_CLASSIFICATION"), (IMAGE_ENCODER, "IMAGE")]
TEXT_TABLES = ("MASKED_LM", "TEXT_ENCODING", "CAUSAL_LM", "SEQUENCE_CLASSIFICATION")
IMAGE_TABLES = ("IMAGE_CLASSIFICATION", "IMAGE", "BACKBONE")
KINDS = "causal LMs, text encoders, image classifiers, image encoders and image-text dual encoders"


def _table(table: str) -> dict:
    """``MODEL_FOR_<table>_MAPPING_NAMES`` ("MODEL": the base models), {} when this transformers lacks it."""
    from transformers.models.auto import modeling_auto

    name = "MODEL_MAPPING_NAMES" if table == "MODEL" else f"MODEL_FOR_{table}_MAPPING_NAMES"
    return getattr(modeling_auto, name, {})


def _classes(table: str) -> set[str]:
    """Class names of a table (a value may be a tuple of alternatives, e.g. DeiT with / without teacher)."""
    names: set[str] = set()
    for value in _table(table).values():
        names.update(value if isinstance(value, (tuple, list)) else [value])
    return names


def _known_class(config) -> str | None:
    """``config.architectures[0]`` when transformers has that class (not custom code), else None."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    return archs[0] if archs and hasattr(transformers, archs[0]) else None


def _two_towers(config) -> bool:
    return getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None


def _base_inputs(config) -> Family | None:
    """The encoder family of a base model, from what its model type takes (tables, else the config)."""
    model_type = getattr(config, "model_type", None)
    if _two_towers(config):
        return None  # a vision-language base model: only dual encoders (the CLIP table) are handled
    if any(model_type in _table(t) for t in TEXT_TABLES):
        return ENCODER
    if any(model_type in _table(t) for t in IMAGE_TABLES):
        return IMAGE_ENCODER
    if getattr(config, "image_size", None) and getattr(config, "num_channels", None):
        return IMAGE_ENCODER  # a vision tower saved alone (CLIPVisionModel)
    return None


def _by_class(arch: str, config) -> Family | None:
    found = next((f for f, t in TABLES if arch in _classes(t)), None)
    return _base_inputs(config) if found is None and arch in _classes("MODEL") else found


def _by_type(model_type: str | None, config) -> Family | None:
    found = next((f for f, t in TABLES if model_type in _table(t)), None)
    if found is None and model_type in _table("MODEL"):
        return _base_inputs(config)
    if found is None and _two_towers(config):
        return CLIP  # custom code (a model type transformers does not know) with a vision and a text tower
    return found


def _missing(what: str, holds) -> UserError:
    """The one-line error for a config that fits no family, naming the tables that do hold it (``holds(table)``)."""
    from transformers.models.auto import modeling_auto

    tables = [n.removeprefix("MODEL_FOR_").removesuffix("_MAPPING_NAMES") for n in dir(modeling_auto)
              if n.startswith("MODEL_FOR_") and n.endswith("_MAPPING_NAMES")]
    held = [t.lower().replace("_", "-") for t in tables if holds(t)]
    if not held:
        return UserError(f"{what} is in none of transformers' model tables: upgrade transformers, or pass one of "
                         f"the {KINDS} that sparsify handles")
    return UserError(f"{what} is listed only in transformers' {' / '.join(held)} tables: sparsify handles {KINDS}")


def family_of(config) -> Family:
    """The family of a transformers config (see the module docstring); anything else is a one-line UserError.

    The returned ``auto_class`` is the checkpoint's own architecture class when transformers has it.
    """
    arch, model_type = _known_class(config), getattr(config, "model_type", None)
    if arch is not None:
        found, what = _by_class(arch, config), f"architecture {arch}"
        holds = lambda t: arch in _classes(t)  # noqa: E731
    else:
        found, what = _by_type(model_type, config), f"model type {model_type!r}"
        holds = lambda t: model_type in _table(t)  # noqa: E731
    encoder_only = arch in _classes("TEXT_ENCODING")  # T5EncoderModel keeps is_encoder_decoder=True
    if getattr(config, "is_encoder_decoder", False) and not encoder_only:
        raise UserError(f"{arch or model_type} is an encoder-decoder (sequence-to-sequence) model, which sparsify "
                        f"does not prune: sparsify handles {KINDS}")
    if found is None:
        raise _missing(what, holds)
    return replace(found, auto_class=arch) if arch else found
