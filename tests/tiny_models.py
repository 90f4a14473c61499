"""Tiny random checkpoints on disk for tests, 2 blocks each: hidden 64, MLP 128, 4 heads.

The first four (Llama with GQA, BERT, ViT, CLIP) are the families' reference models; `ARCHITECTURES`
adds twelve more that stress the generic model handling: GPT-2 (Conv1D weights stored (in, out)),
OPT, GPT-NeoX and Falcon (fused ``query_key_value``), Phi-3 (fused ``qkv_proj``, ``gate_up_proj``),
Mixtral (experts as fused 3-D parameters), Gemma-2 (sliding window 8: calibration windows longer
than it make its sliding and full attention masks differ), StarCoder2 (biases), OLMo-2,
XLM-RoBERTa (saved with its masked-LM head), DINOv2 (saved as the ``Dinov2Model`` backbone) and SigLIP.

Each is saved with ``save_pretrained`` (safetensors) like a real Hugging Face directory. Text models
get a real fast tokenizer (WordPiece, 512 tokens, trained once per process on the stdlib's
`pydoc_data.topics`); image models a preprocessor_config.json (ViT and DINOv2: ImageNet mean/std,
so a test can tell it from the 0.5 default; CLIP: its own mean/std and crop size). Every matrix
dimension is a multiple of 8, so 2:4 and 4:8 apply. About 0.1-0.2 s per model once transformers is imported.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

VOCAB = 512
CLASSES = {"llama": "LlamaForCausalLM", "bert": "BertModel", "vit": "ViTForImageClassification", "clip": "CLIPModel",
           "gpt2": "GPT2LMHeadModel", "opt": "OPTForCausalLM", "gpt_neox": "GPTNeoXForCausalLM",
           "phi3": "Phi3ForCausalLM", "falcon": "FalconForCausalLM", "mixtral": "MixtralForCausalLM",
           "gemma2": "Gemma2ForCausalLM", "starcoder2": "Starcoder2ForCausalLM", "olmo2": "Olmo2ForCausalLM",
           "xlm-roberta": "XLMRobertaForMaskedLM", "dinov2": "Dinov2Model", "siglip": "SiglipModel"}
BODY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
TEXT = {"vocab_size": VOCAB, "max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
GQA = {"num_key_value_heads": 2}
# model type -> config keys beyond BODY (and TEXT for text models): what each needs to be tiny and valid.
ARCHITECTURES = {
    "gpt2": {**TEXT, "n_inner": 128},
    "opt": {**TEXT, "ffn_dim": 128, "word_embed_proj_dim": 64},
    "gpt_neox": TEXT,
    "phi3": {**TEXT, **GQA},
    "falcon": {**TEXT, "new_decoder_architecture": True, "num_kv_heads": 2, "ffn_hidden_size": 128},
    "mixtral": {**TEXT, **GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gemma2": {**TEXT, **GQA, "head_dim": 16, "sliding_window": 8},
    "starcoder2": {**TEXT, **GQA, "use_bias": True},
    "olmo2": {**TEXT, **GQA},
    "xlm-roberta": {**TEXT, "max_position_embeddings": 130},  # positions start after the padding index
    "dinov2": {"mlp_ratio": 2, "image_size": 32, "patch_size": 8},
    "siglip": {"text_config": {**BODY, **TEXT, "max_position_embeddings": 64},
               "vision_config": {**BODY, "image_size": 32, "patch_size": 8}},
}
TEXT_INPUTS = {"llama", "bert", "clip", "siglip"} | {t for t, kw in ARCHITECTURES.items() if "vocab_size" in kw}
IMAGE_INPUTS = {"vit", "clip", "dinov2", "siglip"}
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
CLIP_NORM = {"image_mean": [0.4815, 0.4578, 0.4082], "image_std": [0.2686, 0.2613, 0.2758]}


@lru_cache(maxsize=1)
def _tokenizer():
    """A fast WordPiece tokenizer (lower-cased, BERT special tokens) that AutoTokenizer reloads.

    Its vocabulary is built here, not trained: the tokenizers library's WordPiece trainer breaks ties
    differently in every process, which made token ids (and so every tiny test's data) change between
    runs. Vocabulary: the special tokens, every character of the corpus (as a word start and as a
    ``##`` continuation, so that any word in that alphabet tokenizes), then the most frequent whole
    words, ties broken by the word itself, up to VOCAB entries.
    """
    from collections import Counter

    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for text in topics.values()
                    for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted({c for w in words for c in w})
    vocab = special + chars + [f"##{c}" for c in chars]
    frequent = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    vocab += frequent[:VOCAB - len(vocab)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, splitter
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)


def _config(family: str):
    """The tiny transformers config of ``family``: hidden 64, MLP 128, 4 heads, 2 blocks."""
    from transformers import BertConfig, CLIPConfig, LlamaConfig, ViTConfig

    body = BODY
    if family == "llama":
        return LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                           bos_token_id=2, eos_token_id=3, tie_word_embeddings=False, **body)
    if family == "bert":
        return BertConfig(vocab_size=VOCAB, max_position_embeddings=128, **body)
    if family == "vit":
        return ViTConfig(image_size=32, patch_size=8, num_labels=10, **body)
    if family == "clip":
        text = {"vocab_size": VOCAB, "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 2,
                "eos_token_id": 3, **body}
        return CLIPConfig(text_config=text, vision_config={"image_size": 32, "patch_size": 8, **body},
                          projection_dim=32)
    if family in ARCHITECTURES:
        from transformers import AutoConfig

        return AutoConfig.for_model(family, **BODY, **ARCHITECTURES[family])
    raise ValueError(f"unknown tiny family {family!r}: choose one of {', '.join(CLASSES)}")


def _image_processor(family: str) -> dict:
    if family in ("vit", "dinov2"):
        return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, **IMAGENET}
    if family == "siglip":
        return {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
            "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, **CLIP_NORM}


def make_tiny(family: str, path: Path, seed: int = 0) -> Path:
    """Save a tiny random ``family`` (a key of `CLASSES`) model directory at ``path``; returns ``path``."""
    import transformers
    from transformers.utils import logging

    logging.disable_progress_bar()
    config = _config(family)
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[family])(config).eval()
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    if family in TEXT_INPUTS:
        _tokenizer().save_pretrained(path)
    if family in IMAGE_INPUTS:
        (path / "preprocessor_config.json").write_text(json.dumps(_image_processor(family), indent=1))
    return path
