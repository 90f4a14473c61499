"""``sparsify eval --task zero-shot``: zero-shot classification by an image-text dual encoder (CLIP, SigLIP, ...).

Every image is scored against one caption per class, and its predicted class is the caption whose
embedding is closest: the cosine of the model's projected image and text embeddings
(``get_image_features`` / ``get_text_features``), which orders the captions exactly as CLIP's
``logits_per_image`` does (a positive scale, and SigLIP's bias, change no ranking).

Data (``--data``):
- a folder with one sub-folder per class, images inside each (the layout of ``--task accuracy``):
  class ``i`` is the i-th sub-folder in sorted order, and its caption is ``--template`` with the
  folder name (``_`` and ``-`` read as spaces) in place of ``{}``, e.g. ``"a photo of the digit {}"``
  and a folder ``seven``; default template ``"a photo of a {}."``.
- ``builtin`` (no ``--data``): the 48 built-in photos against their own 48 captions (image-to-text
  retrieval: photo i's class is caption i); ``--template`` does not apply.
Images are resized (shorter side), centre-cropped and normalised with the preprocessor's mean / std,
as calibration does; captions are padded as calibration pads them (`text_padding`: SigLIP to full length).
With a dense baseline, the same images and captions run through it too: its top-1 / top-5 beside
this model's, and the share of images where both pick the same class (``agreement_top1``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from sparsify.calibrate import data
from sparsify.calibrate.batches import normalize_images, text_padding
from sparsify.errors import UserError
from sparsify.eval.accuracy import IMAGES_PER_FORWARD, class_folders, topk

DEFAULT_TEMPLATE = "a photo of a {}."


def check_template(template: str) -> str:
    if "{}" not in template:
        raise UserError(f"--template {template!r} has no {{}} for the class name: e.g. \"a photo of a {{}}.\"")
    return template


def class_captions(names: list[str], template: str) -> list[str]:
    """One caption per class name: ``template`` with the name (``_`` / ``-`` as spaces) in place of ``{}``."""
    check_template(template)
    return [template.replace("{}", " ".join(n.replace("_", " ").replace("-", " ").split())) for n in names]


def _embedding(out) -> torch.Tensor:
    """(n, d) unit-length float32 embeddings of a get_*_features output (a tensor, or an output's pooler_output)."""
    return F.normalize((out if torch.is_tensor(out) else out.pooler_output).float(), dim=-1)


@torch.inference_mode()
def similarities(model, loaded, images: list, captions: list[str], device: str) -> torch.Tensor:
    """(n images, captions) cosine similarities; ``images`` are (3, S, S) tensors in [0, 1] or image files."""
    if not callable(getattr(model, "get_image_features", None)):
        raise UserError("--task zero-shot needs the PyTorch model (get_image_features / get_text_features): "
                        "evaluate the artifact or model directory, not an export")
    text_config = getattr(loaded.config, "text_config", loaded.config)
    limit = getattr(text_config, "max_position_embeddings", None)
    text = loaded.tokenizer(captions, padding=text_padding(model, loaded.tokenizer), truncation=limit is not None,
                            max_length=limit, return_tensors="pt")
    texts = _embedding(model.get_text_features(input_ids=text["input_ids"].to(device),
                                               attention_mask=text["attention_mask"].to(device)))  # (C, d)
    dtype = next(model.parameters()).dtype
    rows = []
    for start in range(0, len(images), IMAGES_PER_FORWARD):
        chunk = images[start:start + IMAGES_PER_FORWARD]
        pixels = torch.stack([x if torch.is_tensor(x) else data.open_image(x, loaded.image_size) for x in chunk])
        pixels = normalize_images(pixels, loaded.image_mean, loaded.image_std).to(device, dtype)  # (b, 3, S, S)
        rows.append((_embedding(model.get_image_features(pixel_values=pixels)) @ texts.T).cpu())  # (b, C)
    return torch.cat(rows)


def zero_shot(loaded, source: str | None, template: str | None = None, baseline=None, device: str = "cpu") -> dict:
    """Zero-shot top-1 / top-5 of ``loaded`` (a `LoadedModel` of the clip family) on ``source`` (see the module doc).

    Returns:
        {"data", "template", "classes", "images", "top1", "top5"}, plus with a ``baseline`` (an ``nn.Module``
        of the same family) {"baseline": {"top1", "top5"}, "agreement_top1"}.
    """
    if source is None or source == "builtin":
        if template is not None:
            raise UserError("--template applies to a --data folder of class sub-folders; the built-in photos are "
                            "scored against their own captions: drop --template or pass --data")
        images, captions = data.load_image_text("builtin", loaded.image_size, 10**6, 0)  # all 48, in order
        items, labels = list(images), torch.arange(len(captions))
        result = {"data": "builtin", "template": None, "classes": len(captions)}
    else:
        template = check_template(template or DEFAULT_TEMPLATE)
        folders = _folders(source)
        captions = class_captions(list(folders), template)
        items = [f for name in folders for f in folders[name]]
        labels = torch.tensor([i for i, name in enumerate(folders) for _ in folders[name]])  # (n,)
        result = {"data": str(source), "template": template, "classes": len(captions)}
    sims = similarities(loaded.model, loaded, items, captions, device)  # (n, C)
    result.update(images=len(items), top1=topk(sims, labels, 1), top5=topk(sims, labels, 5))
    if baseline is not None:
        base = similarities(baseline, loaded, items, captions, device)  # (n, C)
        result["baseline"] = {"top1": topk(base, labels, 1), "top5": topk(base, labels, 5)}
        result["agreement_top1"] = topk(sims, base.argmax(-1), 1)
    return result


def _folders(source: str) -> dict:
    """{class sub-folder name: its image files} of ``source``, sorted; UserError when it is no such folder."""
    root = Path(source)
    folders = class_folders(root) if root.is_dir() else {}
    if not folders:
        raise UserError(f"--data {source} is no folder with class sub-folders of images: pass a folder with one "
                        "sub-folder per class (its name goes into --template)")
    return folders
