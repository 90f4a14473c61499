"""Calibration and evaluation data: text, image and image-text sources turned into model inputs.

Sources: ``builtin`` (Wikipedia text / public-domain photos shipped in `sparsify.data`), a ``.txt``
file, a ``.jsonl`` file with a ``text`` field per line, or a folder of images (optional
``labels.txt`` / ``captions.txt``: ``filename<TAB>value`` per line).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from sparsify.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_text(source: str, split: str = "calib") -> str:
    """All text of a source; ``builtin`` gives the built-in ``calib`` or ``eval`` split."""
    from sparsify.data import text_path

    if source == "builtin":
        return gzip.decompress(text_path(split).read_bytes()).decode()
    path = Path(source)
    if not path.is_file():
        raise UserError(f"data file {source} does not exist: pass a .txt or .jsonl file, or 'builtin'")
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix == ".jsonl":
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        try:
            text = "\n\n".join(json.loads(ln)["text"] for ln in lines)
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path.name}: every line must be a JSON object with a \"text\" field") from None
    else:
        raise UserError(f"{path.name}: unknown text format; use .txt or .jsonl (a \"text\" field per line)")
    if not text.strip():
        raise UserError(f"{path.name} is empty: pass a file with text in it")
    return text


def _tokens(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text in one call (no special tokens, no length warning)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _too_short(n_tokens: int, needed: int) -> UserError:
    return UserError(f"the text has {n_tokens} tokens but needs at least {needed}: "
                     "pass more text or a smaller --seq-len")


def text_windows(tokenizer, text: str, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """n random windows of seq_len tokens (seeded starts, Wanda/SparseGPT style) -> (n, seq_len)."""
    ids = _tokens(tokenizer, text)
    if ids.numel() < seq_len + 1:
        raise _too_short(ids.numel(), seq_len + 1)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g)  # (n,)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def eval_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start -> (n, seq_len)."""
    ids = _tokens(tokenizer, text)
    n = ids.numel() // seq_len
    if n == 0:
        raise _too_short(ids.numel(), seq_len)
    n = min(n, max_windows) if max_windows else n
    return ids[:n * seq_len].view(n, seq_len)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _table(folder: Path, name: str) -> dict[str, str]:
    f = folder / name
    if not f.exists():
        return {}
    return dict(ln.split("\t", 1) for ln in f.read_text().splitlines() if "\t" in ln)


def _square(img, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) float in [0, 1]: resize the shorter side, centre crop."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1).float() / 255


def _pick(count: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=g)[:n].sort().values.tolist()


def _images(source: str, size: int, n: int, seed: int, table: str) -> tuple[torch.Tensor, list[str] | None]:
    from PIL import Image

    if source == "builtin":
        import numpy as np

        from sparsify.data import images_path

        data = np.load(images_path())
        chosen = _pick(len(data["images"]), n, seed)
        imgs = [_square(Image.fromarray(data["images"][i]), size) for i in chosen]
        return torch.stack(imgs), [str(data["captions"][i]) for i in chosen]
    folder = Path(source)
    if not folder.is_dir():
        raise UserError(f"image source {source} is not a folder: pass a folder of .png/.jpg images or 'builtin'")
    files = _image_files(folder)
    if not files:
        raise UserError(f"{folder} holds no .png/.jpg/.jpeg images: add some or use 'builtin'")
    chosen = [files[i] for i in _pick(len(files), n, seed)]
    values = _table(folder, table)
    with_values = [values.get(f.name) for f in chosen]
    return torch.stack([_square(Image.open(f), size) for f in chosen]), \
        (with_values if all(v is not None for v in with_values) else None)


def load_images(source: str, size: int, n: int, seed: int) -> tuple[torch.Tensor, list[str] | None]:
    """(images (n, 3, size, size) in [0, 1], labels from labels.txt or None)."""
    imgs, labels = _images(source, size, n, seed, "labels.txt")
    return imgs, (None if source == "builtin" else labels)


def load_image_text(source: str, size: int, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """(images, captions) from ``builtin`` or a folder with captions.txt."""
    imgs, captions = _images(source, size, n, seed, "captions.txt")
    if captions is None:
        raise UserError(f"{source}: image-text calibration needs captions.txt (filename<TAB>caption per image)")
    return imgs, captions
