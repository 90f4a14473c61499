"""``sparsify eval --task accuracy``: top-1 / top-5 of an image classifier, and agreement with its dense model.

Data (``--data``):
- a folder with one sub-folder per class, images (.png / .jpg / .jpeg) inside each, searched
  recursively (torchvision's ImageFolder layout). Class names are matched to the model's
  ``id2label``: exactly, else ignoring case and treating ``_`` / ``-`` as spaces. When some folder
  name is no label of the model, the sub-folders in sorted order are classes 0, 1, 2, ...
  (ImageFolder's convention), which needs at most as many folders as the model has classes; the
  result says which rule was used (``classes``). Every image is evaluated, 32 per forward.
- ``builtin`` (no ``--data``): the 48 built-in photos. They carry no labels for an arbitrary
  classifier, so there is no top-1 of their own; with a dense baseline, agreement is still
  measured: the share of images where this model's top-1 is the baseline's, and where the
  baseline's top-1 is among this model's top 5.
Images are resized (shorter side) and centre-cropped to the model's size, then normalised with its
preprocessor's mean / std, exactly as calibration does.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sparsify.calibrate import data
from sparsify.calibrate.batches import normalize_images
from sparsify.errors import UserError

IMAGES_PER_FORWARD = 32


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def class_folders(root: Path) -> dict[str, list[Path]]:
    """{sub-folder name: its images, sorted} for every sub-folder holding at least one image (sorted names)."""
    found = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in sub.rglob("*") if f.is_file() and f.suffix.lower() in data.IMAGE_SUFFIXES)
        if files:
            found[sub.name] = files
    return found


def class_ids(names: list[str], id2label: dict, num_labels: int) -> tuple[dict[str, int], str]:
    """Folder name -> class id, and the rule used: "id2label" or "sorted folders"."""
    labels = {str(v): int(k) for k, v in (id2label or {}).items()}
    loose = {_norm(v): k for v, k in labels.items()}
    ids = {n: labels.get(n, loose.get(_norm(n))) for n in names}
    if all(i is not None for i in ids.values()):
        return ids, "id2label"
    if len(names) > num_labels:
        missing = next(n for n, i in ids.items() if i is None)
        raise UserError(f"--data has {len(names)} class folders but the model has {num_labels} classes, and folder "
                        f"{missing!r} is none of its labels: name the folders after the model's id2label labels")
    return {n: i for i, n in enumerate(names)}, "sorted folders"


def labelled_folder(source: str, id2label: dict, num_labels: int) -> tuple[list[Path], torch.Tensor, str]:
    """(image files, labels (n,), class rule) of an ImageFolder-style ``source``."""
    root = Path(source)
    if not root.is_dir():
        raise UserError(f"--data {source} is not a folder: pass a folder with one sub-folder of images per class")
    folders = class_folders(root)
    if not folders:
        raise UserError(f"--data {source} has no sub-folder with images: put each class's images in a sub-folder "
                        "named after the class")
    ids, rule = class_ids(list(folders), id2label, num_labels)
    files = [f for name in folders for f in folders[name]]
    labels = torch.tensor([ids[name] for name in folders for _ in folders[name]])  # (n,)
    return files, labels, rule


@torch.inference_mode()
def logits_of(model, loaded, images: list, device: str) -> torch.Tensor:
    """(n, classes) float32 logits of ``model`` for (3, S, S) images in [0, 1] given as tensors or files."""
    out = []
    for start in range(0, len(images), IMAGES_PER_FORWARD):
        chunk = images[start:start + IMAGES_PER_FORWARD]
        pixels = torch.stack([x if torch.is_tensor(x) else data.open_image(x, loaded.image_size) for x in chunk])
        pixels = normalize_images(pixels, loaded.image_mean, loaded.image_std).to(device)  # (b, 3, S, S)
        out.append(model(pixel_values=pixels).logits.float().cpu())  # (b, classes)
    return torch.cat(out)


def topk(logits: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Share of rows whose ``target`` is among the k highest logits (k capped at the class count)."""
    k = min(k, logits.shape[-1])
    return (logits.topk(k, -1).indices == target[:, None]).any(-1).float().mean().item()


def accuracy(loaded, source: str | None, baseline=None, device: str = "cpu") -> dict:
    """Top-1 / top-5 on a labelled folder (``source``) or agreement only on the built-in photos (None).

    Args:
        loaded: the model under test (`sparsify.models.load.LoadedModel`); ``baseline``: a dense model
            (an ``nn.Module``) run on the same images, or None.
    Returns:
        {"data", "images", "classes", "top1", "top5"} (labelled), plus with a baseline
        {"baseline": {"top1", "top5"}, "agreement_top1", "baseline_in_top5"}.
    """
    config = loaded.config
    if source is None or source == "builtin":
        if baseline is None:
            raise UserError("the built-in photos have no labels for this model: pass --data FOLDER (one sub-folder "
                            "per class) or a --baseline to measure agreement")
        images, _ = data.load_images("builtin", loaded.image_size, 10**6, 0)  # (48, 3, S, S), all of them
        items, labels, result = list(images), None, {"data": "builtin", "classes": None}
    else:
        items, labels, rule = labelled_folder(source, getattr(config, "id2label", None),
                                              getattr(config, "num_labels", 0))
        result = {"data": str(source), "classes": rule}
    logits = logits_of(loaded.model, loaded, items, device)  # (n, classes)
    result["images"] = len(items)
    if labels is not None:
        result.update(top1=topk(logits, labels, 1), top5=topk(logits, labels, 5))
    if baseline is not None:
        base = logits_of(baseline, loaded, items, device)  # (n, classes)
        if base.shape != logits.shape:
            raise UserError(f"the baseline has {base.shape[-1]} classes, this model {logits.shape[-1]}: "
                            "pass the dense model this one was pruned from")
        if labels is not None:
            result["baseline"] = {"top1": topk(base, labels, 1), "top5": topk(base, labels, 5)}
        result["agreement_top1"] = topk(logits, base.argmax(-1), 1)
        result["baseline_in_top5"] = topk(logits, base.argmax(-1), 5)
    return result
