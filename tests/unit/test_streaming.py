"""Streaming prune (issue #15): one block resident at a time, the same artifact as the in-memory run.

The reference is the in-memory pipeline on the same checkpoint: every tensor of the streamed artifact
must be bit-identical and the manifest must describe the same packed tensors, ties and totals.
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny

from sparsify.config import CalibConfig, PruneConfig
from sparsify.errors import UserError
from sparsify.exporters.safetensors_io import read_tensors
from sparsify.pipeline import prune
from sparsify.config import parse_size

CALIB = CalibConfig(samples=4, seq_len=32, batch_size=2)


def _both(src, tmp_path, **kw):
    """(manifest, tensors) of the in-memory and of the streamed prune of ``src`` with the same options."""
    runs = []
    for label, mm in (("memory", None), ("streamed", "64MB")):
        out = tmp_path / label
        manifest = prune(str(src), PruneConfig(calib=CALIB, max_memory=mm, **kw), out)
        runs.append((manifest, read_tensors(out)))
    return runs


@pytest.mark.parametrize("family, kw", [
    ("llama", {"method": "sparsegpt", "scheme": "2:4", "quant": "int8"}),
    ("gpt2", {"method": "wanda", "scheme": "2:4"}),  # Conv1D weights, head tied to the embeddings
    ("bert", {"method": "sparsegpt", "scheme": "unstructured", "sparsity": 0.6}),
    ("vit", {"method": "wanda", "scheme": "4:8"}),
    ("gpt_neox", {"method": "magnitude", "scheme": "2:4"}),  # checkpoint names renamed by transformers on load
    ("gemma2", {"method": "wanda", "scheme": "unstructured"}),  # per-block masks
])
def test_streamed_artifact_equals_the_in_memory_one(family, kw, tmp_path):
    src = make_tiny(family, tmp_path / family)
    (m1, t1), (m2, t2) = _both(src, tmp_path, **kw)
    assert t1.keys() == t2.keys()
    different = [k for k in t1 if t1[k].dtype != t2[k].dtype or not torch.equal(t1[k], t2[k])]
    assert not different, different[:5]
    for key in ("tensors", "tied", "totals", "plan", "solver", "calibration"):
        assert m1[key] == m2[key], key
    assert "streaming" not in m1
    s = m2["streaming"]
    assert s["max_memory_bytes"] == 64_000_000 and 0 < s["planned_peak_bytes"] <= s["max_memory_bytes"]
    assert set(s["planned"]) == {"capture", "blocks", "writing the rest"}
    if family == "gpt2":
        assert m2["tied"] == {"lm_head.weight": "transformer.wte.weight"}


def test_streamed_run_reads_each_block_once_and_frees_it(tmp_path, monkeypatch):
    """Blocks are read when reached and back on meta after; the head is never read before the end."""
    from sparsify import streaming

    src = make_tiny("llama", tmp_path / "llama")
    seen = []
    leave = streaming.BlockStreamer.leave

    def spy(self, name, block):
        resident = [n for n, p in self.weights.model.named_parameters() if p.device.type != "meta"]
        seen.append((name, resident))
        leave(self, name, block)
        assert all(p.device.type == "meta" for p in block.parameters())

    monkeypatch.setattr(streaming.BlockStreamer, "leave", spy)
    prune(str(src), PruneConfig(method="wanda", calib=CALIB, max_memory="64MB"), tmp_path / "out")
    assert [name for name, _ in seen] == ["model.layers.0", "model.layers.1"]
    for name, resident in seen:
        assert resident and all(n.startswith(name + ".") for n in resident), resident  # one block, nothing else


@pytest.mark.parametrize("case, kw, words", [
    ("clip", {}, ["2 block lists", "drop --max-memory"]),
    ("llama", {"allocation": "owl"}, ["--allocation owl"]),
    ("llama", {"distill_steps": 2}, ["--distill-steps"]),
    ("mixtral", {}, ["converts the checkpoint tensor", "drop --max-memory"]),
    ("llama", {"max_memory": "2KB"}, ["planned peak", "raise --max-memory"]),
])
def test_what_cannot_stream_is_refused_before_any_work(case, kw, words, tmp_path):
    src = make_tiny(case, tmp_path / case)
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        prune(str(src), PruneConfig(calib=CALIB, **{"max_memory": "64MB", **kw}), out)
    for word in words:
        assert word in str(e.value), (word, str(e.value))
    assert not out.exists()


@pytest.mark.parametrize("text, expected", [("1GB", 10**9), ("512MiB", 512 << 20), ("1.5gib", int(1.5 * 2**30)),
                                            ("2000", 2000), (" 3 kb ", 3000)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "1 XB", "-1GB", "0", ""])
def test_parse_size_refuses(text):
    with pytest.raises(UserError, match="--max-memory"):
        parse_size(text)


def test_streamed_weights_tie_groups_and_unload(tmp_path):
    """A tied head is read once under its embedding's checkpoint name; unload sends both names to meta."""
    from sparsify.models.load import load_model, resolve
    from sparsify.models.stream import StreamedWeights

    src = make_tiny("gpt2", tmp_path / "gpt2")
    loaded = load_model(resolve(str(src)), meta=True)
    model = loaded.model
    weights = StreamedWeights(model, loaded.source.weight_files)
    assert weights.groups["lm_head.weight"] == ["transformer.wte.weight", "lm_head.weight"]
    weights.load(["lm_head.weight"])
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.device.type == "cpu"
    from safetensors.torch import load_file

    assert torch.equal(model.lm_head.weight.detach(), load_file(src / "model.safetensors")["transformer.wte.weight"])
    weights.unload(["transformer.wte.weight"])
    assert model.lm_head.weight.device.type == "meta" and model.transformer.wte.weight.device.type == "meta"
    assert model.transformer.h[0].attn.c_attn.weight.device.type == "meta"  # nothing else was read


def test_peak_rss_resets(tmp_path):
    from sparsify.resources import peak_rss_mb, reset_peak_rss, trim_freed_memory

    x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    x.add_(1)
    del x
    trim_freed_memory()
    high = peak_rss_mb()
    if not reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak resident memory")
    assert peak_rss_mb() <= high - 32  # the 64 MiB spike is no longer part of the peak


def test_nan_in_a_streamed_block_stops_the_run_and_leaves_nothing(tmp_path):
    """A bad tensor is found when its block is read, mid-run: one error naming it, no artifact."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = make_tiny("llama", tmp_path / "llama")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    state = load_file(bad / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight holds NaN"):
        prune(str(bad), PruneConfig(calib=CALIB, max_memory="64MB"), out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad", "llama"]
