"""The calibration set as a list of model-kwargs batches, for each input kind of a model family.

`calibration_batches(loaded, calib)` for a loaded model; `build_batches` for the parts of one;
`normalize_images` is the pixel normalisation every image path (calibration, ONNX export) shares.
"""
from __future__ import annotations

import torch

from sparsify.calibrate import data
from sparsify.errors import UserError


def normalize_images(images: torch.Tensor, mean, std) -> torch.Tensor:
    """(n, 3, S, S) pixels in [0, 1] -> (x - mean) / std per channel (0.5 / 0.5 when not given)."""
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
    pixels = normalize_images(images, image_mean, image_std)  # (n, 3, S, S)
    return [{"pixel_values": chunk} for chunk in pixels.split(calib.batch_size)]


def _image_text(calib, tokenizer, image_size, image_mean, image_std, max_text_len, padding="longest",
                **_) -> list[dict]:
    if _is_text_source(calib.source) and calib.source != "builtin":
        raise UserError(f"--calib {calib.source}: an image-text model needs a folder of images with captions.txt, "
                        "or 'builtin'")
    images, captions = data.load_image_text(calib.source, image_size, calib.samples, calib.seed)
    pixels = normalize_images(images, image_mean, image_std)
    batches = []
    for start in range(0, len(captions), calib.batch_size):
        text = tokenizer(captions[start:start + calib.batch_size], padding=padding, truncation=True,
                         max_length=max_text_len or calib.seq_len, return_tensors="pt")
        batches.append({"pixel_values": pixels[start:start + calib.batch_size], "input_ids": text["input_ids"],
                        "attention_mask": text["attention_mask"]})
    return batches


BUILDERS = {"text": _text, "image": _image, "image-text": _image_text}


def build_batches(inputs: str, calib, *, tokenizer=None, image_size=None, image_mean=None, image_std=None,
                  max_text_len=None, padding: str = "longest") -> list[dict[str, torch.Tensor]]:
    """``calib`` (`sparsify.config.CalibConfig`) -> batches of at most ``calib.batch_size`` samples.

    ``padding`` ("longest" | "max_length", see `text_padding`) applies to image-text captions.
    """
    return BUILDERS[inputs](calib, tokenizer=tokenizer, image_size=image_size, image_mean=image_mean,
                            image_std=image_std, max_text_len=max_text_len, padding=padding)


PROBE_CAPTION, PROBE_PADS = "a photo of a small dog", 8
PADDING_RTOL = 1e-2  # relative change of the text embedding that counts as "depends on padding"


@torch.inference_mode()
def text_padding(model, tokenizer) -> str:
    """How an image-text model's captions must be padded: "max_length" when its text embedding
    depends on trailing padding, else "longest".

    CLIP pools the end-of-text token behind a causal mask, so padding is invisible to it; SigLIP pools
    the last position and was trained on captions padded to its full length (64), so its captions must
    be padded the same way. Probed (one caption, with and without ``PROBE_PADS`` masked pad tokens)
    rather than decided by model name; a model without ``get_text_features`` keeps "longest".
    """
    features = getattr(model, "get_text_features", None)
    if features is None or tokenizer is None or tokenizer.pad_token_id is None:
        return "longest"
    device = next(model.parameters(), torch.empty(0)).device
    text = tokenizer([PROBE_CAPTION], return_tensors="pt")
    ids, mask = text["input_ids"].to(device), text["attention_mask"].to(device)  # (1, T)
    pads = torch.full((1, PROBE_PADS), tokenizer.pad_token_id, dtype=ids.dtype, device=device)  # (1, P)

    def embed(i, m):
        out = features(input_ids=i, attention_mask=m)
        return (out if torch.is_tensor(out) else out.pooler_output).float()  # (1, d)

    a, b = embed(ids, mask), embed(torch.cat([ids, pads], 1), torch.cat([mask, torch.zeros_like(pads)], 1))
    return "max_length" if (a - b).abs().max() > PADDING_RTOL * a.abs().max() else "longest"


def _max_text_len(config) -> int | None:
    text = getattr(config, "text_config", None) or config
    return getattr(text, "max_position_embeddings", None)


def calibration_batches(loaded, calib) -> list[dict]:
    """The batches for a `LoadedModel` (its family's inputs, tokenizer and image preprocessing)."""
    padding = text_padding(loaded.model, loaded.tokenizer) if loaded.family.inputs == "image-text" else "longest"
    return build_batches(loaded.family.inputs, calib, tokenizer=loaded.tokenizer,
                         image_size=loaded.image_size, image_mean=loaded.image_mean,
                         image_std=loaded.image_std, max_text_len=_max_text_len(loaded.config), padding=padding)
