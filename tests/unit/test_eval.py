"""Evaluation metrics against hand-computed references; sizes, report files, tables and task dispatch."""
from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from transformers import BertConfig, BertModel, CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

from sparsify.errors import UserError
from sparsify.eval import run
from sparsify.eval.agreement import BY_FAMILY, clip_cosine, embedding_cosine, logit_agreement
from sparsify.eval.perplexity import perplexity
from sparsify.eval.report import write_report
from sparsify.eval.size import overall, size_summary, weight_sparsity
from sparsify.eval.tables import ellipsize, eval_table, info_table, split_name


def _llama(seed, vocab=64):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def _kl_top1_loop(p, q, positions):
    """KL(softmax p || softmax q) and same-argmax, one position at a time, in float64."""
    kl = top1 = 0.0
    for idx in positions:
        lp, lq = torch.log_softmax(p[idx].double(), -1), torch.log_softmax(q[idx].double(), -1)
        kl += sum(lp[v].exp().item() * (lp[v] - lq[v]).item() for v in range(len(lp)))
        top1 += float(p[idx].argmax() == q[idx].argmax())
    return kl / len(positions), top1 / len(positions)


# ---------------------------------------------------------------- perplexity


def test_perplexity_matches_slow_loop():
    model, windows = _llama(0), torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    done = []
    got = perplexity(model, windows, batch_size=2, progress=done.append)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0]  # (T, vocab)
            for t in range(len(w) - 1):
                nll -= torch.log_softmax(logits[t].double(), -1)[w[t + 1]].item()
                n += 1
    assert got["tokens"] == n == 24 and got["windows"] == 3 and got["seq_len"] == 9 and done == [2, 1]
    assert math.isclose(got["nll"], nll / n, rel_tol=1e-5)
    assert math.isclose(got["perplexity"], math.exp(nll / n), rel_tol=1e-5)
    assert math.isclose(perplexity(model, windows, batch_size=3)["nll"], got["nll"], rel_tol=1e-6)


@pytest.mark.parametrize("shape", [(4,), (2, 1), (0, 8)])
def test_perplexity_rejects_unusable_windows(shape):
    with pytest.raises(UserError, match="seq-len"):
        perplexity(_llama(0), torch.zeros(shape, dtype=torch.long))


# ---------------------------------------------------------------- agreement


def test_logit_agreement_by_hand_skips_padding():
    a, b = _llama(0), _llama(1)
    g = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    batch = {"input_ids": torch.randint(0, 64, (2, 5), generator=g), "attention_mask": mask}
    r = logit_agreement(a, b, [batch])
    with torch.no_grad():
        p, q = b(**batch).logits, a(**batch).logits  # baseline, model: (2, 5, vocab)
    kl, top1 = _kl_top1_loop(p, q, [(i, t) for i in range(2) for t in range(5) if mask[i, t]])
    assert r["positions"] == 8 and math.isclose(r["kl"], kl, rel_tol=1e-4) and math.isclose(r["top1"], top1)
    same = logit_agreement(a, a, [batch])
    assert same["top1"] == 1.0 and abs(same["kl"]) < 1e-6


def test_logit_agreement_on_classifier_logits():
    g = torch.Generator().manual_seed(3)
    lin_a, lin_b = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)

    def as_model(lin):
        return lambda pixel_values: SimpleNamespace(logits=lin(pixel_values))  # (b, classes)

    batches = [{"pixel_values": torch.randn(4, 6, generator=g)}, {"pixel_values": torch.randn(3, 6, generator=g)}]
    r = BY_FAMILY["image-classifier"](as_model(lin_a), as_model(lin_b), batches)
    with torch.no_grad():
        x = torch.cat([b["pixel_values"] for b in batches])
        kl, top1 = _kl_top1_loop(lin_b(x), lin_a(x), list(range(7)))
    assert r["positions"] == 7 and math.isclose(r["kl"], kl, rel_tol=1e-4) and math.isclose(r["top1"], top1)


def test_embedding_cosine_uses_masked_mean_pooling():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    a, b = BertModel(cfg).eval(), BertModel(cfg).eval()
    batch = {"input_ids": torch.randint(0, 64, (2, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 3 + [0] * 3])}
    with torch.no_grad():
        ha, hb = a(**batch).last_hidden_state, b(**batch).last_hidden_state  # (2, 6, 32)
    pooled = lambda h: torch.stack([h[0].mean(0), h[1, :3].mean(0)])  # noqa: E731
    cos = [torch.dot(x, y).item() / (x.norm() * y.norm()).item() for x, y in zip(pooled(ha), pooled(hb))]
    r = embedding_cosine(a, b, [batch])
    assert math.isclose(r["cosine"], sum(cos) / 2, rel_tol=1e-5)
    assert math.isclose(r["min_cosine"], min(cos), rel_tol=1e-5)
    assert r["samples"] == 2 and BY_FAMILY["encoder"] is embedding_cosine


def test_clip_cosine_of_image_and_text_embeds():
    cfg = CLIPConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=16),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, image_size=16, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    a, b = CLIPModel(cfg).eval(), CLIPModel(cfg).eval()
    batch = {"input_ids": torch.randint(0, 64, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long),
             "pixel_values": torch.randn(3, 3, 16, 16)}
    with torch.no_grad():
        oa, ob = a(**batch), b(**batch)
    cos = lambda x, y: sum((x[i] @ y[i] / (x[i].norm() * y[i].norm())).item() for i in range(3)) / 3  # noqa: E731
    r = clip_cosine(a, b, [batch])
    assert math.isclose(r["image_cosine"], cos(oa.image_embeds, ob.image_embeds), rel_tol=1e-5)
    assert math.isclose(r["text_cosine"], cos(oa.text_embeds, ob.text_embeds), rel_tol=1e-5)
    assert math.isclose(r["cosine"], (r["image_cosine"] + r["text_cosine"]) / 2, rel_tol=1e-6)


# ---------------------------------------------------------------- size


class _Packed(torch.nn.Module):
    """Stands in for a SparseLinear: the weight only comes out of dense_weight()."""

    def __init__(self, weight):
        super().__init__()
        self.register_buffer("values", weight)

    def dense_weight(self):
        return self.values


def test_weight_sparsity_counts_zeros_in_linear_and_packed_modules():
    g = torch.Generator().manual_seed(4)
    w1 = torch.randn(8, 12, generator=g) * (torch.rand(8, 12, generator=g) > 0.3)
    w2 = torch.randn(5, 7, generator=g) * (torch.rand(5, 7, generator=g) > 0.8)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), _Packed(w2))
    model[0].weight.data.copy_(w1)
    layers = weight_sparsity(model, ["1", "0"])
    assert list(layers) == ["1", "0"]
    for name, w in (("0", w1), ("1", w2)):
        zeros = sum(1 for v in w.flatten().tolist() if v == 0.0)
        want = {"numel": w.numel(), "nnz": w.numel() - zeros, "sparsity": pytest.approx(zeros / w.numel())}
        assert layers[name] == want
    tot = overall(layers)
    assert tot["count"] == 2 and tot["numel"] == 96 + 35
    assert math.isclose(tot["sparsity"], 1 - (layers["0"]["nnz"] + layers["1"]["nnz"]) / 131)


def _manifest():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    shapes, nnz, packed = [[64, 64], [64, 128], [64, 64]], [2048, 4096, 1500], [9000, 17000, 8000]
    tensors = {f"{n}.weight": {"module": n, "format": "nm" if i < 2 else "bitmask", "keys": ["values"], "shape": s,
                               "dtype": "float32", "attrs": {"n": 2, "m": 4, "quant": "int4", "group_size": 32}
                               if i < 2 else {}, "numel": s[0] * s[1], "nnz": z, "sparsity": 1 - z / (s[0] * s[1]),
                               "bytes": b, "dense_bytes": s[0] * s[1] * 4}
               for i, (n, s, z, b) in enumerate(zip(names, shapes, nnz, packed))}
    numel = sum(e["numel"] for e in tensors.values())
    return {"format_version": 1, "sparsify_version": "0.1.0", "created": "2026-01-01T00:00:00",
            "source": {"path": "/data/checkpoints/" + "very-long-directory-name/" * 4 + "llama", "alias": None,
                       "family": "causal-lm", "model_type": "llama", "files": {}},
            "config": {"method": "sparsegpt", "scheme": "2:4", "sparsity": 0.5, "per": "row", "quant": "int4",
                       "targets": None, "ignore": ["re:lm_head"], "method_args": {"damp": 0.01, "blocksize": 128}},
            "calibration": {"source": "builtin", "samples": 16, "seq_len": 256, "seed": 0, "tokens": 4096},
            "tensors": tensors, "skipped": {"model.layers.1.mlp.up_proj.weight": "shape not divisible by 4"},
            "totals": {"targets": 3, "numel": numel, "nnz": sum(nnz), "sparsity": 1 - sum(nnz) / numel,
                       "packed_bytes": sum(packed), "dense_bytes": 4 * numel, "ratio": sum(packed) / (4 * numel)},
            "files": {"model.safetensors": 500_000, "model-extra.safetensors": 1000},
            "timing": {"prune_s": 12.5, "peak_rss_mb": 900.0}}


def test_size_summary_from_manifest():
    m = _manifest()
    s = size_summary(m)
    assert list(s["layers"]) == list(m["tensors"]) and s["targets"] == 3 and s["skipped"] == 1
    assert s["packed_bytes"] == 34000 and s["dense_bytes"] == 4 * (4096 + 8192 + 4096)
    assert math.isclose(s["ratio"], m["totals"]["ratio"]) and math.isclose(s["sparsity"], m["totals"]["sparsity"])
    assert s["layers"]["model.layers.0.mlp.down_proj.weight"]["ratio"] == 17000 / (8192 * 4)
    assert s["disk_bytes"] == 501_000 and s["dense_disk_bytes"] == 501_000 - 34000 + 4 * 16384
    assert size_summary({**m, "files": {}})["disk_bytes"] is None


# ---------------------------------------------------------------- report and tables


def _result():
    layers = {f"model.layers.{i}.mlp.{p}": {"numel": 64, "nnz": 64 - 16 * (i % 3), "sparsity": (i % 3) / 4}
              for i in range(4) for p in ("up_proj", "down_proj")}
    return {"model": "/tmp/art", "family": "causal-lm", "task": "perplexity", "artifact": True,
            "perplexity": {"perplexity": 21.5, "nll": math.log(21.5), "tokens": 1022, "windows": 2, "seq_len": 512,
                           "data": "builtin", "split": "eval"},
            "agreement": {"baseline": "smollm2-135m", "inputs": {}, "kl": 0.12, "top1": 0.8, "positions": 1024},
            "size": {"layers": layers, **overall(layers)}, "bytes": size_summary(_manifest())}


def test_write_report_files(tmp_path):
    result = _result()
    files = write_report(result, tmp_path / "rep")
    assert [f.name for f in files] == ["eval.json", "sparsity.png"] and all(f.stat().st_size > 0 for f in files)
    assert json.loads(files[0].read_text()) == result
    assert files[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(UserError, match="pip install matplotlib"):
        write_report(_result(), tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


def _render(items, width=100) -> list[str]:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    for item in items:
        console.print(item)
    return console.export_text().splitlines()


def test_info_table_is_readable_in_100_columns():
    lines = _render(info_table(_manifest()))
    text = "\n".join(lines)
    assert max(map(len, lines)) <= 100
    for want in ("sparsegpt (damp=0.01, blocksize=128)", "2:4", "int4", "builtin: 16 samples x 256", "nm 2:4 int4/g32",
                 "self_attn.q_proj", "64x128", "bitmask", "3 tensors", f"{34000 / 65536:.3f}", "blocks: model.layers.N",
                 "shape not divisible by 4", "501.0 kB", "12.5 s"):
        assert want in text, want
    row = next(ln for ln in lines if "mlp.down_proj" in ln)
    assert row.split()[:2] == ["0", "mlp.down_proj"] and row.split()[-1] == f"{17000 / 32768:.3f}"


def test_eval_table_rows():
    text = "\n".join(_render([eval_table(_result())]))
    for want in ("21.500", "builtin eval text", "2 x 512", "KL(baseline||this) 0.1200 nats/token",
                 "same top-1 80.0%", "1,024 positions",
                 "over 8 layers", "0.0% .. 50.0%", "34.0 kB vs 65.5 kB dense"):
        assert want in text, want


def test_split_name_and_ellipsize():
    assert split_name("model.layers.12.self_attn.q_proj.weight") == ("model.layers", 12, "self_attn.q_proj")
    assert split_name("lm_head.weight") == ("", None, "lm_head")
    assert ellipsize("short") == "short"


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=0, max_size=80), st.integers(5, 40))
def test_ellipsize_fits_and_keeps_both_ends(text, width):
    out = ellipsize(text, width)
    assert len(out) <= width
    if len(text) > width:
        assert text.startswith(out.split("…")[0]) and text.endswith(out.rsplit("…", 1)[1])
    else:
        assert out == text


# ---------------------------------------------------------------- evaluate(): dispatch, with the loaders faked


@pytest.fixture
def fake_open(monkeypatch):
    """open_model -> a tiny Llama (or BERT) as a LoadedModel-like namespace; text loaders -> fixed ids."""
    import sparsify.calibrate.data as data
    import sparsify.runtime.load as load

    models = {"llm": (_llama(0), "causal-lm"), "base": (_llama(1), "causal-lm"),
              "enc": (BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4)).eval(), "encoder")}
    opened = []

    def open_model(arg, dtype=None, device="cpu", max_memory=None, forward_tokens=None):
        opened.append(arg)
        model, family = models[arg]
        return SimpleNamespace(model=model, config=model.config, tokenizer=None,
                               family=SimpleNamespace(name=family, inputs="text")), None

    ids = torch.randint(0, 64, (40 * 16,), generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(load, "open_model", open_model)
    monkeypatch.setattr(data, "load_text", lambda source, split="calib": f"{source}:{split}")
    monkeypatch.setattr(data, "eval_windows", lambda tok, text, seq_len, n: ids[:n * seq_len].view(n, seq_len))
    return SimpleNamespace(models=models, opened=opened, ids=ids)


def test_evaluate_perplexity_agreement_and_size(fake_open):
    bars = []

    @contextmanager
    def progress_factory(description, total):
        bars.append([description, total, 0])
        yield lambda n=1: bars[-1].__setitem__(2, bars[-1][2] + n)

    r = run.evaluate("llm", baseline="base", seq_len=16, max_windows=3, batch_size=2, progress_factory=progress_factory)
    json.dumps(r)
    assert r["task"] == "perplexity" and r["artifact"] is False and fake_open.opened == ["llm", "base"]
    windows = fake_open.ids[:48].view(3, 16)
    want = perplexity(fake_open.models["llm"][0], windows, batch_size=2)
    assert r["perplexity"] == {**want, "data": "builtin", "split": "eval"}
    assert bars == [["perplexity", 3, 3], ["perplexity (baseline)", 3, 3]]  # the baseline: same windows
    dense = perplexity(fake_open.models["base"][0], windows, batch_size=2)
    assert r["baseline"] == {"model": "base", "from": "argument", "perplexity": {**dense, "data": "builtin", "split": "eval"},
                             "ratio": want["perplexity"] / dense["perplexity"]}
    batch = {"input_ids": windows, "attention_mask": torch.ones_like(windows)}
    assert math.isclose(r["agreement"]["kl"], logit_agreement(*(fake_open.models[k][0] for k in ("llm", "base")),
                                                              [batch])["kl"], rel_tol=1e-5)
    assert r["agreement"]["inputs"] == {"data": "builtin", "split": "eval", "windows": 3, "seq_len": 16}
    assert len(r["size"]["layers"]) == 14 and r["size"]["sparsity"] == 0.0 and "bytes" not in r


def test_evaluate_defaults_and_errors(fake_open):
    r = run.evaluate("enc", baseline="enc", seq_len=8, max_windows=20)
    assert r["task"] == "agreement" and r["agreement"]["samples"] == 8 and r["agreement"]["cosine"] > 1 - 1e-5
    assert run.evaluate("enc")["task"] == "size"
    with pytest.raises(UserError, match="choose one of perplexity, agreement, size, accuracy"):
        run.evaluate("llm", task="top1")
    with pytest.raises(UserError, match="--task accuracy does not apply to a causal-lm"):
        run.evaluate("llm", task="accuracy")
    with pytest.raises(UserError, match="does not apply to an encoder"):
        run.evaluate("enc", task="perplexity")
    with pytest.raises(UserError, match="needs --baseline"):
        run.evaluate("llm", task="agreement")
    with pytest.raises(UserError, match="is a causal-lm, not an encoder"):
        run.evaluate("enc", baseline="llm")
    with pytest.raises(UserError, match="longer than this model's context"):
        run.evaluate("llm", seq_len=10_000)
