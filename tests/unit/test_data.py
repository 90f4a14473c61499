"""Built-in data and calibration sources."""
from __future__ import annotations

import gzip
import json

import pytest
import torch
from tiny_models import _tokenizer

from sparsify.calibrate.batches import build_batches
from sparsify.calibrate.data import eval_windows, load_image_text, load_images, load_text, text_windows
from sparsify.config import CalibConfig
from sparsify.data import DATA_DIR
from sparsify.errors import UserError


def test_builtin_splits_never_overlap():
    titles = {s: set((DATA_DIR / f"wiki_{s}_titles.txt").read_text().split("\n")) - {""} for s in ("calib", "eval")}
    assert titles["calib"] and titles["eval"] and not titles["calib"] & titles["eval"]
    calib, ev = load_text("builtin", "calib"), load_text("builtin", "eval")
    assert len(calib) > 1_000_000 and len(ev) > 250_000
    for start in range(0, len(ev) - 200, len(ev) // 50):  # 50 long samples of the eval text
        assert ev[start:start + 200] not in calib
    assert sum(f.stat().st_size for f in DATA_DIR.iterdir()) < 1_200_000


def test_text_windows_are_seeded_and_eval_windows_consecutive():
    tok, text = _tokenizer(), load_text("builtin", "eval")
    a, b = text_windows(tok, text, 4, 16, seed=0), text_windows(tok, text, 4, 16, seed=0)
    assert a.shape == (4, 16) and torch.equal(a, b) and not torch.equal(a, text_windows(tok, text, 4, 16, seed=1))
    ev = eval_windows(tok, text, 16, max_windows=3)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ev.shape == (3, 16) and ev.flatten().tolist() == ids[:48]


def test_text_sources_and_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps({"text": "world"}) + "\n")
    assert load_text(str(tmp_path / "a.jsonl")) == "hello\n\nworld"
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("a few words")
    for path, words in [("bad.jsonl", '"text" field'), ("empty.txt", "empty"), ("x.csv", "does not exist")]:
        with pytest.raises(UserError, match=words):
            load_text(str(tmp_path / path))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match=".txt or .jsonl"):
        load_text(str(tmp_path / "x.csv"))
    with pytest.raises(UserError, match="--seq-len"):
        text_windows(_tokenizer(), load_text(str(tmp_path / "short.txt")), 2, 64, 0)


def test_images_builtin_and_folder(tmp_path):
    from PIL import Image

    imgs, labels = load_images("builtin", 24, 5, seed=0)
    assert imgs.shape == (5, 3, 24, 24) and 0 <= imgs.min() and imgs.max() <= 1 and labels is None
    images, captions = load_image_text("builtin", 24, 3, seed=0)
    assert len(captions) == 3 and all("photo" in c or "image" in c for c in captions)
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (40 + i, 30), color).save(tmp_path / f"{i}.png")
    (tmp_path / "labels.txt").write_text("0.png\tred\n1.png\tgreen\n2.png\tblue\n")
    imgs, labels = load_images(str(tmp_path), 8, 3, seed=0)
    assert labels == ["red", "green", "blue"] and torch.allclose(imgs[0, 0], torch.ones(8, 8))
    with pytest.raises(UserError, match="captions.txt"):
        load_image_text(str(tmp_path), 8, 3, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .png"):
        load_images(str(tmp_path / "empty"), 8, 1, 0)


def test_build_batches_per_input_kind():
    calib = CalibConfig(samples=5, seq_len=12, batch_size=2)
    text = build_batches("text", calib, tokenizer=_tokenizer(), max_text_len=8)
    assert [b["input_ids"].shape for b in text] == [(2, 8), (2, 8), (1, 8)]
    img = build_batches("image", calib, image_size=16, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    raw, _ = load_images("builtin", 16, 5, 0)
    torch.testing.assert_close(img[0]["pixel_values"], (raw[:2] - 0.5) / 0.25)
    both = build_batches("image-text", calib, tokenizer=_tokenizer(), image_size=16, max_text_len=6)
    assert both[0]["input_ids"].shape[1] <= 6 and both[0]["pixel_values"].shape == (2, 3, 16, 16)
    with pytest.raises(UserError, match="folder of images"):
        build_batches("image", CalibConfig(source="x.txt"), image_size=16)


def test_gzip_is_deterministic():
    assert gzip.decompress((DATA_DIR / "wiki_eval.txt.gz").read_bytes()).decode().startswith("ASCII")
