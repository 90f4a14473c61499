"""The calibration set as a list of model-kwargs batches, for each input kind of a model family."""
from __future__ import annotations

import torch

from sparsify.calibrate import data
from sparsify.errors import UserError


def _normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean if mean is not None else [0.5] * 3).view(1, 3, 1, 1)
    std = torch.tensor(std if std is not None else [0.5] * 3).view(1, 3, 1, 1)
    return (images - mean) / std


def _is_text_source(source: str) -> bool:
    return source == "builtin" or source.endswith((".txt", ".jsonl"))


def _text(calib, tokenizer, max_text_len, **_) -> list[dict]:
    if calib.source != "builtin" and not calib.source.endswith((".txt", ".jsonl")):
        raise UserError(f"--calib {calib.source}: a text model needs a .txt or .jsonl file, or 'builtin'")
    seq_len = min(calib.seq_len, max_text_len or calib.seq_len)
    ids = data.text_windows(tokenizer, data.load_text(calib.source, "calib"), calib.samples, seq_len, calib.seed)  # (n, T)
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(calib.batch_size)]


def _image(calib, image_size, image_mean, image_std, **_) -> list[dict]:
    if _is_text_source(calib.source) and calib.source != "builtin":
        raise UserError(f"--calib {calib.source}: an image model needs a folder of images, or 'builtin'")
    images, _labels = data.load_images(calib.source, image_size, calib.samples, calib.seed)
    pixels = _normalize(images, image_mean, image_std)  # (n, 3, S, S)
    return [{"pixel_values": chunk} for chunk in pixels.split(calib.batch_size)]


def _image_text(calib, tokenizer, image_size, image_mean, image_std, max_text_len, **_) -> list[dict]:
    if _is_text_source(calib.source) and calib.source != "builtin":
        raise UserError(f"--calib {calib.source}: CLIP needs a folder of images with captions.txt, or 'builtin'")
    images, captions = data.load_image_text(calib.source, image_size, calib.samples, calib.seed)
    pixels = _normalize(images, image_mean, image_std)
    batches = []
    for start in range(0, len(captions), calib.batch_size):
        text = tokenizer(captions[start:start + calib.batch_size], padding=True, truncation=True,
                         max_length=max_text_len or calib.seq_len, return_tensors="pt")
        batches.append({"pixel_values": pixels[start:start + calib.batch_size], "input_ids": text["input_ids"],
                        "attention_mask": text["attention_mask"]})
    return batches


BUILDERS = {"text": _text, "image": _image, "image-text": _image_text}


def build_batches(inputs: str, calib, *, tokenizer=None, image_size=None, image_mean=None, image_std=None,
                  max_text_len=None) -> list[dict[str, torch.Tensor]]:
    """``calib`` (`sparsify.config.CalibConfig`) -> batches of at most ``calib.batch_size`` samples."""
    return BUILDERS[inputs](calib, tokenizer=tokenizer, image_size=image_size, image_mean=image_mean,
                            image_std=image_std, max_text_len=max_text_len)
