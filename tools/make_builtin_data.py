"""Regenerate the built-in data shipped in sparsify/data/ (deterministic; not imported by sparsify).

Text: the Wikipedia articles bundled with gensim's test data, cleaned with gensim's own wiki
filters, split BY ARTICLE (sorted by title; every 5th article goes to evaluation) into a calibration
part and a held-out evaluation part that never share an article.
Images: 64x64 crops of public-domain photos bundled with scikit-image and matplotlib, each with a caption.

    pip install scikit-image   # only for this script
    python tools/make_builtin_data.py
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "sparsify" / "data"
CALIB_CHARS, EVAL_CHARS = 1_200_000, 300_000

PHOTOS = {  # file -> caption; each public domain or CC0 per its skimage.data docstring (Grace Hopper: US Navy)
    "astronaut.png": "a portrait photo of an astronaut in an orange spacesuit",
    "coffee.png": "a photo of a cup of coffee on a saucer",
    "chelsea.png": "a photo of a cat",
    "rocket.jpg": "a photo of a rocket on a launch pad",
    "camera.png": "a black and white photo of a man filming with a camera on a tripod",
    "hubble_deep_field.jpg": "a telescope image of distant galaxies",
    "retina.jpg": "a medical photo of a human retina",
    "grace_hopper.jpg": "a portrait photo of a woman in a navy uniform",
}


def _is_prose(line: str) -> bool:
    """A paragraph of running text: long, ends like a sentence, not a heading/list/table/gallery line."""
    return len(line) >= 120 and line[0] not in "=*#:;|!{}" and line[-1] in ".!?\"')" \
        and not re.match(r"(File|Image):", line)


def _clean(text: str) -> str:
    """Wiki markup -> readable paragraphs separated by one blank line."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(text)
    text = re.sub(r"'{2,}", "", text)  # bold / italic quotes
    text = re.sub(r"\[\[|\]\]|\{\{|\}\}", "", text)  # unbalanced link / template brackets
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # parentheses emptied by dropped templates: "()", "( ; )"
    text = re.sub(r"\(\s*[,;]\s*", "(", text)  # "(, lit. ..." -> "(lit. ..."
    text = re.sub(r"[ \t]+([,.;:])", r"\1", text)  # space left before punctuation by a dropped template
    text = re.sub(r"[ \t]+", " ", text)
    lines = (ln.strip() for ln in text.splitlines())  # one wiki line = one paragraph
    return "\n\n".join(ln for ln in lines if _is_prose(ln))


def make_text() -> dict:
    import gensim
    from gensim.corpora.wikicorpus import extract_pages

    src = Path(gensim.__file__).parent / "test" / "test_data" / \
        "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    articles = {}
    for title, text, _ in extract_pages(bz2.BZ2File(src)):
        if text.lstrip().lower().startswith("#redirect"):
            continue
        body = _clean(text)
        if len(body) > 500:
            articles[title] = body
    titles = sorted(articles)
    parts = {"eval": [t for i, t in enumerate(titles) if i % 5 == 2], "calib": [t for i, t in enumerate(titles) if i % 5 != 2]}
    info = {}
    for split, limit in (("calib", CALIB_CHARS), ("eval", EVAL_CHARS)):
        chosen, size = [], 0
        for t in parts[split]:
            if size >= limit:
                break
            chosen.append(t)
            size += len(articles[t])
        text = "\n\n".join(f"{t}\n\n{articles[t]}" for t in chosen)
        data = gzip.compress(text.encode(), compresslevel=9, mtime=0)
        (OUT / f"wiki_{split}.txt.gz").write_bytes(data)
        (OUT / f"wiki_{split}_titles.txt").write_text("\n".join(chosen) + "\n")
        info[split] = {"articles": len(chosen), "chars": len(text), "sha256": hashlib.sha256(data).hexdigest()}
    return info


def _load_photo(name: str):
    from PIL import Image

    import matplotlib
    import skimage

    for base in (Path(skimage.__file__).parent / "data", Path(matplotlib.get_data_path()) / "sample_data"):
        if (base / name).exists():
            return Image.open(base / name).convert("RGB")
    raise FileNotFoundError(name)


def _npz(arrays: dict) -> bytes:
    """np.savez_compressed with a fixed zip timestamp, so the bytes depend only on the arrays."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, member.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return buf.getvalue()


def make_images(per_photo: int = 6, size: int = 64) -> dict:
    from PIL import Image

    rng = np.random.default_rng(0)
    crops, captions = [], []
    for name, caption in PHOTOS.items():
        img = _load_photo(name)
        w, h = img.size
        for k in range(per_photo):
            if k == 0:  # the whole picture, centre-cropped to a square
                side = min(w, h)
                box = ((w - side) // 2, (h - side) // 2)
            else:
                side = int(min(w, h) * rng.uniform(0.5, 0.9))
                box = (int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1)))
            crop = img.crop((box[0], box[1], box[0] + side, box[1] + side)).resize((size, size), Image.BICUBIC)
            crops.append(np.asarray(crop, dtype=np.uint8))
            captions.append(caption)
    blob = _npz({"images": np.stack(crops), "captions": np.array(captions)})
    (OUT / "images.npz").write_bytes(blob)
    return {"images": len(crops), "size": size, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


if __name__ == "__main__":
    print(json.dumps({"text": make_text(), "images": make_images()}, indent=1))
