"""Built-in calibration / evaluation data shipped with sparsify (sources and licences in README.md)."""
from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).parent


def text_path(split: str) -> Path:
    """The built-in Wikipedia text of a split: ``calib`` or ``eval`` (gzip)."""
    return DATA_DIR / f"wiki_{split}.txt.gz"


def images_path() -> Path:
    return DATA_DIR / "images.npz"
