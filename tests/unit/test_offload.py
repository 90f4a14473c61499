"""Artifacts larger than memory (issue #15): accelerate places what fits, the rest is read per forward.

The reference is the same artifact loaded whole: the logits and the evaluation must be identical,
and the blocks placed on disk must hold no tensor in memory between forwards.
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny

from sparsify.config import CalibConfig, PruneConfig
from sparsify.errors import UserError
from sparsify.pipeline import prune
from sparsify.runtime import offload
from sparsify.runtime.load import load_artifact


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    out = {}
    for family, kw in (("llama", {"method": "sparsegpt", "scheme": "2:4", "quant": "int8"}),
                       ("gpt2", {"method": "wanda", "scheme": "2:4"})):  # gpt2: head tied to the embeddings
        src = make_tiny(family, root / family)
        out[family] = root / f"{family}-art"
        prune(str(src), PruneConfig(calib=CalibConfig(samples=4, seq_len=32, batch_size=2), **kw), out[family])
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_offloaded_artifact_gives_the_same_logits(artifacts, family, monkeypatch):
    monkeypatch.setattr(offload, "WORKSPACE", 0)  # tiny models: room for a few blocks only
    whole, _ = load_artifact(artifacts[family])
    part, _ = load_artifact(artifacts[family], max_memory="450KB", forward_tokens=16)
    placed = set(part.model.hf_device_map.values())
    assert placed == {"cpu", "disk"}, part.model.hf_device_map
    ids = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = whole.model(ids).logits, part.model(ids).logits
    assert torch.equal(a, b)
    stored = offload.header_tensors(artifacts[family])[0]  # the artifact's tensor names
    on_disk = [n for n, d in part.model.hf_device_map.items() if d == "disk"]
    for name in on_disk:  # between forwards an offloaded module holds none of the artifact's tensors
        module = part.model.get_submodule(name)
        held = [f"{name}.{k}" for k, t in list(module.named_parameters()) + list(module.named_buffers())
                if f"{name}.{k}" in stored and t.device.type != "meta"]
        assert not held, held


def test_offloaded_evaluation_matches(artifacts, monkeypatch):
    from sparsify.eval.run import evaluate

    monkeypatch.setattr(offload, "WORKSPACE", 0)
    kw = dict(task="perplexity", seq_len=16, max_windows=2, batch_size=1)
    a = evaluate(str(artifacts["llama"]), auto_baseline=False, **kw)
    b = evaluate(str(artifacts["llama"]), max_memory="450KB", **kw)
    assert a["perplexity"] == b["perplexity"] and a["size"] == b["size"]  # size: zeros counted in the weights


@pytest.mark.parametrize("arg, kw, words", [
    ("llama", {"max_memory": "1KB"}, ["raise --max-memory"]),
    ("llama", {"max_memory": "1GB", "baseline": "llama"}, ["drop --baseline"]),
    ("source", {"max_memory": "1GB"}, ["not one", "drop --max-memory"]),
])
def test_offload_refusals(artifacts, arg, kw, words, tmp_path):
    from sparsify.eval.run import evaluate

    path = str(artifacts["llama"]) if arg == "llama" else str(artifacts["llama"].parent / "llama")
    if "baseline" in kw:
        kw["baseline"] = str(artifacts["llama"].parent / "llama")
    with pytest.raises(UserError) as e:
        evaluate(path, task="perplexity", seq_len=16, max_windows=1, **kw)
    for word in words:
        assert word in str(e.value), (word, str(e.value))
