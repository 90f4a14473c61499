"""Tiny random checkpoints on disk for tests: Llama (GQA), BERT, ViT and CLIP, 2 blocks each.

Text models get a real fast tokenizer (WordPiece trained on stdlib `pydoc_data.topics`), image
models a preprocessor_config.json. Dimensions are multiples of 8 so 2:4 and 4:8 apply.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def _tokenizer():
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(list(topics.values()), trainers.WordPieceTrainer(vocab_size=512, special_tokens=special))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)


def _configs():
    from transformers import BertConfig, CLIPConfig, LlamaConfig, ViTConfig

    return {
        "llama": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             pad_token_id=0, tie_word_embeddings=False),
        "bert": BertConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=128),
        "vit": ViTConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_labels=10),
        "clip": CLIPConfig(text_config={"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                                        "num_hidden_layers": 2, "num_attention_heads": 4,
                                        "max_position_embeddings": 64, "pad_token_id": 0, "eos_token_id": 3},
                           vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 64,
                                          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
                           projection_dim=32),
    }


def make_tiny(family: str, path: Path, seed: int = 0) -> Path:
    """Save a tiny random ``family`` (llama | bert | vit | clip) model directory at ``path``."""
    import transformers

    classes = {"llama": "LlamaForCausalLM", "bert": "BertModel", "vit": "ViTForImageClassification",
               "clip": "CLIPModel"}
    torch.manual_seed(seed)
    model = getattr(transformers, classes[family])(_configs()[family]).eval()
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    if family in ("llama", "bert", "clip"):
        _tokenizer().save_pretrained(path)
    if family in ("vit", "clip"):
        (path / "preprocessor_config.json").write_text(json.dumps(
            {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32}}))
    return path
