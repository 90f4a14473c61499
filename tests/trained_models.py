"""A small ViT trained in-process on real images, so vision tests can measure accuracy that means something.

Data: scikit-learn's ``load_digits`` (1,797 handwritten digits, 8x8, 0..16; BSD-3, shipped inside the
package, no download), each upscaled to 32x32 (bicubic), grey in 3 channels, quantized to uint8 like
a PNG, in [0, 1]. A seeded 80/20 split: 1,437 training and 360 held-out images.

Model: `transformers.ViTForImageClassification`, image 32, patch 8 (16 patches + CLS), hidden 64, MLP
128, 4 heads, 2 blocks (the tiny ViT's shape, so block:16x16 applies), labels "0".."9", normalisation
mean = std = 0.5. AdamW + one-cycle, 20 epochs of batch 64 (460 steps): 96.1% held-out top-1 (99.9%
train); about 25 s on two idle CPU cores (75 s on a loaded one), once per machine thanks to the cache.

Cached: the directory (``save_pretrained`` + preprocessor_config.json + trained.json with the
held-out accuracy) lives under $SPARSIFY_TEST_CACHE, else the system temp dir, in a folder named by
a hash of the training code and its constants, written to a temp folder and renamed, so concurrent sessions
and later test runs reuse it and any change to the recipe retrains.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

SIZE, PATCH, SEED = 32, 8, 0
BODY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
TRAIN = {"epochs": 20, "batch": 64, "lr": 2e-3, "weight_decay": 0.05, "shift": False}  # shift: +-2 px rolls
PREPROCESSOR = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                "size": {"height": SIZE, "width": SIZE}, "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images (n, 3, 32, 32) in [0, 1] on the uint8 grid, train labels (n,), test images, test labels)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    grey = (d.images / 16 * 255).round().astype(np.uint8)  # (1797, 8, 8)
    big = np.stack([np.array(Image.fromarray(g).resize((SIZE, SIZE), Image.BICUBIC)) for g in grey])  # (1797, 32, 32)
    images = torch.from_numpy(big).float().div(255)[:, None].expand(-1, 3, -1, -1).contiguous()  # (1797, 3, 32, 32)
    labels = torch.from_numpy(d.target).long()  # (1797,)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SEED))
    cut = int(0.8 * len(labels))
    train, test = order[:cut], order[cut:]
    return images[train], labels[train], images[test], labels[test]


def _config():
    from transformers import ViTConfig

    return ViTConfig(image_size=SIZE, patch_size=PATCH, num_labels=10, id2label={i: str(i) for i in range(10)},
                     label2id={str(i): i for i in range(10)}, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, **BODY)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.5  # (n, 3, S, S), mean = std = 0.5 as in PREPROCESSOR


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 of ``model`` on images (n, 3, S, S) in [0, 1]."""
    logits = torch.cat([model(pixel_values=_normalize(x)).logits for x in images.split(256)])  # (n, 10)
    return (logits.argmax(-1) == labels).float().mean().item()


def train_vit(out: Path) -> dict:
    """Train the digits ViT and save it as a Hugging Face directory at ``out``; returns its record."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    xtr, ytr, xte, yte = digits()
    torch.manual_seed(SEED)
    model = transformers.ViTForImageClassification(_config())
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])
    steps = TRAIN["epochs"] * -(-len(ytr) // TRAIN["batch"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, TRAIN["lr"], total_steps=steps)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(TRAIN["epochs"]):
        for idx in torch.randperm(len(ytr), generator=gen).split(TRAIN["batch"]):
            x = xtr[idx]  # (b, 3, S, S)
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()  # optional small translations
            x = torch.roll(x, shifts=shift, dims=(2, 3)) if TRAIN["shift"] else x
            loss = torch.nn.functional.cross_entropy(model(pixel_values=_normalize(x)).logits, ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    record = {"train_top1": accuracy(model, xtr, ytr), "test_top1": accuracy(model, xte, yte),
              "train_images": len(ytr), "test_images": len(yte), "recipe": TRAIN}
    model.save_pretrained(out, safe_serialization=True)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    (out / "trained.json").write_text(json.dumps(record, indent=1))
    return record


def _key() -> str:
    """Hash of what makes the model: the data, config and training code and their constants (not docs)."""
    import inspect

    code = "".join(inspect.getsource(f) for f in (digits, _config, _normalize, train_vit))
    text = code + json.dumps([BODY, TRAIN, SIZE, PATCH, SEED, PREPROCESSOR])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_root() -> Path:
    base = os.environ.get("SPARSIFY_TEST_CACHE")
    return Path(base) / "trained" if base else Path(tempfile.gettempdir()) / "sparsify-trained-models"


def trained_vit_dir(root: Path | None = None) -> Path:
    """The cached digits ViT directory, trained on first use (atomically: temp folder, then rename)."""
    root = Path(root) if root is not None else cache_root()
    final = root / f"digits-vit-{_key()}"
    if (final / "trained.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-digits-vit-", dir=root))
    try:
        train_vit(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another session finished first: use theirs
            if not (final / "trained.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_digit_folder(path: Path, n: int | None = None, names: list[str] | None = None) -> Path:
    """The held-out digits as PNGs in one sub-folder per class (``names[label]``, default "0".."9")."""
    from PIL import Image

    _, _, xte, yte = digits()
    names = names or [str(i) for i in range(10)]
    for i, (x, y) in enumerate(zip(xte[:n], yte[:n])):
        folder = Path(path) / names[int(y)]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (x[0] * 255).round().byte().numpy()  # (S, S) grey
        Image.fromarray(pixels).convert("RGB").save(folder / f"{i:04d}.png")
    return Path(path)


@pytest.fixture(scope="session")
def trained_vit() -> Path:
    """Session fixture: the trained digits ViT directory (see the module docstring)."""
    pytest.importorskip("sklearn")
    return trained_vit_dir()
