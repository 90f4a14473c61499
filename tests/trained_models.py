"""A small ViT and a small CLIP trained in-process on real images, so vision tests can measure accuracy that means
something. (This docstring describes the ViT; the CLIP's recipe is in the comment above `DIGIT_WORDS`.)

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
    return _cached("digits-vit", _key(), train_vit, root)


def _cached(name: str, key: str, train, root: Path | None = None) -> Path:
    """root/NAME-KEY, made by ``train(folder)`` on first use (in a temp folder, then renamed into place)."""
    root = Path(root) if root is not None else cache_root()
    final = root / f"{name}-{key}"
    if (final / "trained.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        train(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another session finished first: use theirs
            if not (final / "trained.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_digit_folder(path: Path, n: int | None = None, names: list[str] | None = None,
                       split: str = "test") -> Path:
    """The held-out (``split="test"``) or training digits as PNGs in one sub-folder per class
    (``names[label]``, default "0".."9"); training images serve as in-domain calibration data."""
    from PIL import Image

    xtr, ytr, xte, yte = digits()
    if split == "train":
        xte, yte = xtr, ytr
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


# --- a small CLIP trained on the same digits, with captions ------------------------------------------------------
# CLIPModel, both towers the tiny shape (hidden 64, MLP 128, 4 heads, 2 blocks; image 32, patch 8; projection 32),
# a word-level tokenizer over the caption vocabulary ([BOS] words [EOS], lower-cased, unknown words -> [UNK]).
# Each training image gets a caption from a template drawn at random every step, e.g. "a photo of the digit
# seven", "a handwritten 7", "the number seven". Loss: CLIP's symmetric image-text cross-entropy over the batch
# (model's own learnable logit scale) with every same-digit pair a positive (targets spread evenly over them): a
# batch of 64 holds ~6 images of each digit and often the same caption twice, so CLIP's one-positive targets
# contradict themselves (they stalled near 28% zero-shot in a trial run). AdamW + one-cycle, 20 epochs of batch 64
# (460 steps) on one thread (two threads on a loaded 2-core machine were ~30x slower for a model this small): 96.9%
# held-out zero-shot top-1 ("a photo of the digit {}" against the 10 digit words; 99.9% on the training images),
# 20-28 s on a loaded 2-core machine. `write_caption_folder` writes captioned training digits for --calib.

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLIP_TEMPLATES = ("a photo of the digit {w}", "a handwritten {d}", "the number {w}", "a handwritten digit {w}",
                  "an image of the number {d}", "a picture of a {w}", "the digit {d}", "a {w}")
ZERO_SHOT_TEMPLATE = "a photo of the digit {}"  # the class captions of the held-out evaluation (words)
CLIP_TEXT = {"max_position_embeddings": 16, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
CLIP_TRAIN = {"epochs": 20, "batch": 64, "lr": 2e-3, "weight_decay": 0.05, "threads": 1}
CLIP_PREPROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": SIZE},
                     "do_center_crop": True, "crop_size": {"height": SIZE, "width": SIZE}, "do_rescale": True,
                     "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def caption(label: int, template: int) -> str:
    """The caption of digit ``label`` in template number ``template`` of CLIP_TEMPLATES."""
    return CLIP_TEMPLATES[template].format(w=DIGIT_WORDS[label], d=label)


def clip_tokenizer():
    """A fast word-level tokenizer over the captions' words (ids: [PAD] 0, [UNK] 1, [BOS] 2, [EOS] 3, then the
    words sorted), that AutoTokenizer reloads."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {w for t in CLIP_TEMPLATES for w in t.replace("{w}", " ").replace("{d}", " ").split()}
    words |= set(DIGIT_WORDS) | {str(d) for d in range(10)} | set(ZERO_SHOT_TEMPLATE.replace("{}", " ").split()) | {"."}
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", pair="[BOS] $A [EOS] $B [EOS]",
                                                       special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", model_max_length=CLIP_TEXT["max_position_embeddings"])


def _clip_config(vocab_size: int):
    from transformers import CLIPConfig

    return CLIPConfig(text_config={**BODY, **CLIP_TEXT, "vocab_size": vocab_size},
                      vision_config={**BODY, "image_size": SIZE, "patch_size": PATCH}, projection_dim=32)


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images: torch.Tensor, labels: torch.Tensor,
                       template: str = ZERO_SHOT_TEMPLATE) -> float:
    """Top-1 of the images (n, 3, S, S) in [0, 1] against the 10 captions ``template`` makes of the digit words."""
    text = tokenizer([template.format(w) for w in DIGIT_WORDS], padding=True, return_tensors="pt")
    logits = torch.cat([model(**text, pixel_values=_normalize(x)).logits_per_image for x in images.split(256)])
    return (logits.argmax(-1) == labels).float().mean().item()  # logits (n, 10)


def train_clip(out: Path, seed: int = SEED) -> dict:
    """Train the digits CLIP and save it (model, tokenizer, preprocessor) at ``out``; returns its record.

    ``seed`` draws the initial weights, the batch order and the caption templates; the train / held-out split
    stays the one of ``digits()``, so every seed is evaluated on the same 360 held-out images."""
    import time

    import transformers

    transformers.utils.logging.disable_progress_bar()
    xtr, ytr, xte, yte = digits()
    tokenizer = clip_tokenizer()
    threads, start = torch.get_num_threads(), time.perf_counter()
    torch.set_num_threads(CLIP_TRAIN["threads"])
    try:
        torch.manual_seed(seed)
        model = transformers.CLIPModel(_clip_config(len(tokenizer)))
        opt = torch.optim.AdamW(model.parameters(), lr=CLIP_TRAIN["lr"], weight_decay=CLIP_TRAIN["weight_decay"])
        steps = CLIP_TRAIN["epochs"] * -(-len(ytr) // CLIP_TRAIN["batch"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, CLIP_TRAIN["lr"], total_steps=steps)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(CLIP_TRAIN["epochs"]):
            for idx in torch.randperm(len(ytr), generator=gen).split(CLIP_TRAIN["batch"]):
                y = ytr[idx]  # (b,)
                drawn = torch.randint(len(CLIP_TEMPLATES), (len(y),), generator=gen).tolist()
                text = tokenizer([caption(c, t) for c, t in zip(y.tolist(), drawn)], padding=True, return_tensors="pt")
                logits = model(**text, pixel_values=_normalize(xtr[idx])).logits_per_image  # (b, b)
                same = (y[:, None] == y[None, :]).float()  # (b, b), symmetric: one target for both directions
                target = same / same.sum(1, keepdim=True)
                loss = (torch.nn.functional.cross_entropy(logits, target)
                        + torch.nn.functional.cross_entropy(logits.T, target)) / 2
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        train_s = time.perf_counter() - start
        record = {"train_zero_shot_top1": zero_shot_accuracy(model, tokenizer, xtr, ytr),
                  "test_zero_shot_top1": zero_shot_accuracy(model, tokenizer, xte, yte),
                  "template": ZERO_SHOT_TEMPLATE, "classes": list(DIGIT_WORDS), "train_images": len(ytr),
                  "test_images": len(yte), "train_s": round(train_s, 1), "recipe": CLIP_TRAIN,
                  "train_templates": list(CLIP_TEMPLATES), "seed": seed}
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=1))
    (out / "trained.json").write_text(json.dumps(record, indent=1))
    return record


def _clip_key() -> str:
    import inspect

    code = "".join(inspect.getsource(f) for f in (digits, _normalize, caption, clip_tokenizer, _clip_config,
                                                   zero_shot_accuracy, train_clip))
    text = code + json.dumps([BODY, SIZE, PATCH, SEED, DIGIT_WORDS, CLIP_TEMPLATES, ZERO_SHOT_TEMPLATE, CLIP_TEXT,
                              CLIP_TRAIN, CLIP_PREPROCESSOR])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def trained_clip_dir(root: Path | None = None, seed: int = SEED) -> Path:
    """The cached digits CLIP directory, trained on first use (see the CLIP section's comment); other seeds
    train independent replicas of it (bench/ecoflap_clip.py compares methods over several)."""
    name = "digits-clip" if seed == SEED else f"digits-clip-seed{seed}"
    return _cached(name, _clip_key(), lambda out: train_clip(out, seed), root)


def write_caption_folder(path: Path, n: int = 64, seed: int = SEED) -> Path:
    """``n`` training digits (never the held-out ones) as PNGs with captions.txt (``file<TAB>caption``, seeded
    templates): image-caption calibration data for ``--calib``."""
    from PIL import Image

    xtr, ytr, _, _ = digits()
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(ytr), generator=gen)[:n].tolist()
    drawn = torch.randint(len(CLIP_TEMPLATES), (len(picks),), generator=gen).tolist()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (p, t) in enumerate(zip(picks, drawn)):
        Image.fromarray((xtr[p, 0] * 255).round().byte().numpy()).convert("RGB").save(path / f"{i:04d}.png")
        lines.append(f"{i:04d}.png\t{caption(int(ytr[p]), t)}")
    (path / "captions.txt").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def trained_clip() -> Path:
    """Session fixture: the trained digits CLIP directory (see the CLIP section above)."""
    pytest.importorskip("sklearn")
    return trained_clip_dir()
