"""Calibration and evaluation data: text, image and image-text sources turned into model inputs.

Sources: ``builtin`` (Wikipedia text / public-domain photos shipped in `sparsify.data`), a ``.txt``
file, a ``.jsonl`` file with a ``text`` field per line, or a folder of images (optional
``labels.txt`` / ``captions.txt``: ``filename<TAB>value`` per line).
Random choices all come from ``torch.Generator().manual_seed(seed)``, so a seed fixes the data.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import torch

from sparsify.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TEXT_SUFFIXES = (".txt", ".jsonl")


def _read_jsonl(path: Path) -> str:
    """The ``text`` fields of a JSON-lines file, joined as paragraphs."""
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{path.name} line {number}: every line must be a JSON object with a \"text\" string field")
        texts.append(record["text"])
    return "\n\n".join(texts)


def load_text(source: str, split: str = "calib") -> str:
    """All text of a source; ``builtin`` gives the built-in ``calib`` or held-out ``eval`` split."""
    if source == "builtin":
        from sparsify.data import text_path

        if split not in ("calib", "eval"):
            raise UserError(f"unknown built-in text split {split!r}: use 'calib' or 'eval'")
        return gzip.decompress(text_path(split).read_bytes()).decode("utf-8")
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise UserError(f"{path.name}: unknown text format; pass a .txt file, a .jsonl file (a \"text\" field "
                        "per line) or 'builtin'")
    if not path.is_file():
        raise UserError(f"data file {source} does not exist: pass an existing .txt or .jsonl file, or 'builtin'")
    text = _read_jsonl(path) if suffix == ".jsonl" else path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UserError(f"{path.name} is empty: pass a file with text in it")
    return text


_CHUNK, _SEAM = 1 << 16, 512  # characters tokenized at a time; context checked on each side of a cut


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _safe_cut(tokenizer, text: str, lo: int, hi: int) -> int | None:
    """A position in [lo, hi) where tokenizing the two sides apart gives the same ids as together:
    the last newline (else space) that passes that test on ``_SEAM`` characters either side."""
    for sep in ("\n", " "):
        cut = text.rfind(sep, lo, hi)
        for _ in range(4):
            if cut <= lo:
                break
            left, right = text[max(0, cut - _SEAM):cut], text[cut:cut + _SEAM]
            if _encode(tokenizer, left + right) == _encode(tokenizer, left) + _encode(tokenizer, right):
                return cut
            cut = text.rfind(sep, lo, cut)
    return None


def _tokens(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text -> (N,), the same ids as one call on all of it.

    A tokenizer's output for a whole corpus costs hundreds of bytes per token (offsets, token strings),
    so a long text is tokenized ``_CHUNK`` characters at a time, cut only where the ids on both sides
    of the cut come out as they do together; where no such cut is found the rest goes in one call.
    No special tokens (windows are cut from the middle of the stream); ``verbose=False`` silences the
    "longer than the specified maximum sequence length" warning, which is expected for a whole corpus.
    """
    ids: list[int] = []
    start = 0
    while len(text) - start > 2 * _CHUNK:
        cut = _safe_cut(tokenizer, text, start + _CHUNK // 2, start + _CHUNK)
        if cut is None:
            break
        ids += _encode(tokenizer, text[start:cut])
        start = cut
    ids += _encode(tokenizer, text[start:])
    return torch.tensor(ids, dtype=torch.long)


def _too_short(n_tokens: int, needed: int) -> UserError:
    return UserError(f"the text has {n_tokens} tokens but needs at least {needed}: "
                     "pass more text or a smaller --seq-len")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise UserError(f"{name} is {value}: pass a positive number")


def text_windows(tokenizer, text: str, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """n random windows of seq_len tokens (seeded starts, Wanda/SparseGPT style).

    Returns:
        LongTensor (n, seq_len); the same seed gives the same windows.
    """
    _check_positive(samples=n, seq_len=seq_len)
    ids = _tokens(tokenizer, text)  # (N,)
    if ids.numel() < seq_len + 1:
        raise _too_short(ids.numel(), seq_len + 1)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g)  # (n,)
    return ids[starts[:, None] + torch.arange(seq_len)]  # (n, seq_len)


def eval_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start of the text (for perplexity).

    Returns:
        LongTensor (n, seq_len), n = min(full windows in the text, max_windows).
    """
    _check_positive(seq_len=seq_len, max_windows=max_windows)
    ids = _tokens(tokenizer, text)  # (N,)
    n = ids.numel() // seq_len
    if n == 0:
        raise _too_short(ids.numel(), seq_len)
    n = n if max_windows is None else min(n, max_windows)
    return ids[:n * seq_len].view(n, seq_len)  # (n, seq_len)


def _pick(count: int, n: int, seed: int) -> list[int]:
    """A seeded choice of min(n, count) of range(count), in ascending order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=g)[:n].sort().values.tolist()


def _square(img, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) float in [0, 1]: resize the shorter side to size, centre crop."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    img = img.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # (size, size, 3)
    return pixels.permute(2, 0, 1).float() / 255  # (3, size, size)


def _table(folder: Path, name: str) -> dict[str, str]:
    """``filename<TAB>value`` lines of folder/name -> {filename: value}; {} if there is no such file."""
    path = folder / name
    if not path.is_file():
        return {}
    rows = [ln.split("\t", 1) for ln in path.read_text(encoding="utf-8").splitlines() if "\t" in ln]
    return {key.strip(): value.strip() for key, value in rows}


def _open(path: Path, size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return _square(img, size)
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"cannot read image {path}: remove or replace the file ({err})") from None


def open_image(path: Path, size: int) -> torch.Tensor:
    """One image file -> (3, size, size) float in [0, 1] (shorter side resized, centre crop); UserError if unreadable."""
    return _open(Path(path), size)


def _builtin_images(size: int, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    from PIL import Image

    from sparsify.data import images_path

    with np.load(images_path()) as data:
        images, captions = data["images"], data["captions"]  # (48, 64, 64, 3) uint8, (48,)
    chosen = _pick(len(images), n, seed)
    return torch.stack([_square(Image.fromarray(images[i]), size) for i in chosen]), [str(captions[i]) for i in chosen]


def _folder_images(source: str, size: int, n: int, seed: int, table: str) -> tuple[torch.Tensor, list[str] | None]:
    """Seeded choice of n images of a folder (recursive, sorted) and their values from ``table`` (or None)."""
    folder = Path(source)
    if not folder.is_dir():
        raise UserError(f"image source {source} is not a folder: pass a folder of .png/.jpg images or 'builtin'")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{folder} holds no .png/.jpg/.jpeg images: add some or use 'builtin'")
    chosen = [files[i] for i in _pick(len(files), n, seed)]
    values = _table(folder, table)
    found = [values.get(f.relative_to(folder).as_posix(), values.get(f.name)) for f in chosen]
    images = torch.stack([_open(f, size) for f in chosen])  # (n, 3, size, size)
    return images, (found if all(v is not None for v in found) else None)


def load_images(source: str, size: int, n: int, seed: int) -> tuple[torch.Tensor, list[str] | None]:
    """Images for calibration or evaluation.

    Args:
        source: ``builtin`` or a folder of .png/.jpg/.jpeg (searched recursively); an optional
            ``labels.txt`` (filename<TAB>label) gives labels.
        size: side of the square output; n: how many (fewer if the source has fewer); seed: the choice.
    Returns:
        (images (n, 3, size, size) float in [0, 1], labels of every chosen image, or None).
    """
    _check_positive(size=size, samples=n)
    if source == "builtin":
        return _builtin_images(size, n, seed)[0], None
    return _folder_images(source, size, n, seed, "labels.txt")


def load_image_text(source: str, size: int, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """(images (n, 3, size, size) in [0, 1], captions) from ``builtin`` or a folder with captions.txt."""
    _check_positive(size=size, samples=n)
    if source == "builtin":
        return _builtin_images(size, n, seed)
    images, captions = _folder_images(source, size, n, seed, "captions.txt")
    if captions is None:
        raise UserError(f"{source}: image-text calibration needs captions.txt with a line "
                        "'filename<TAB>caption' for every image")
    return images, captions
