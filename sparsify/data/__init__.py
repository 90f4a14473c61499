"""Built-in calibration / evaluation data shipped with sparsify (sources and licences in README.md).

Regenerate with ``python tools/make_builtin_data.py``; `sparsify.calibrate.data` reads these files.
"""
from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).parent
TEXT_SPLITS = ("calib", "eval")


def text_path(split: str) -> Path:
    """The built-in Wikipedia text of a split, ``calib`` or ``eval`` (UTF-8, gzip)."""
    return DATA_DIR / f"wiki_{split}.txt.gz"


def titles_path(split: str) -> Path:
    """The article titles of a built-in text split, one a line (used to check the split is clean)."""
    return DATA_DIR / f"wiki_{split}_titles.txt"


def images_path() -> Path:
    """The built-in photos: ``images`` (N, 64, 64, 3) uint8 and ``captions`` (N,) str, in one .npz."""
    return DATA_DIR / "images.npz"
