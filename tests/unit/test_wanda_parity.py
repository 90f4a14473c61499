"""Issue 14, item 0: sparsify's Wanda computes what the official code (github.com/locuslab/wanda,
``prune_wanda``) computes. The reference below re-implements that procedure independently of
sparsify's runner: one sample per forward, the running average of squared input norms per column,
the metric |W| * sqrt(norm), every Linear of a block pruned from the dense block's statistics, then
the pruned block's outputs feed the next block. Same model, same calibration samples: the masks
must agree everywhere but at near-ties (float summation order differs: batches of 2 against one
sample at a time), and the pruned models' outputs must agree closely."""
from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny

import sparsify
from sparsify.calibrate.batches import build_batches
from sparsify.config import CalibConfig, PruneConfig
from sparsify.models.load import load_model, resolve


def _official_style_wanda(model, samples, n, m):
    """The official prune_wanda loop on a Llama-layout model; prunes it in place."""
    layers, rotary = model.model.layers, model.model.rotary_emb
    inps = [model.model.embed_tokens(ids[None]) for ids in samples]  # (1, seq, hidden) each
    pos = torch.arange(samples[0].shape[0])[None]
    for layer in layers:
        lins = {k: v for k, v in layer.named_modules() if isinstance(v, torch.nn.Linear)}
        scaler = {k: torch.zeros(v.in_features) for k, v in lins.items()}
        count = {k: 0 for k in lins}

        def hook(name):
            def f(_mod, inp, _out):
                x = inp[0].reshape(-1, inp[0].shape[-1]).t().float()  # (in, tokens)
                scaler[name] *= count[name] / (count[name] + 1)
                count[name] += 1
                scaler[name] += torch.norm(x, p=2, dim=1) ** 2 / count[name]
            return f

        handles = [lin.register_forward_hook(hook(k)) for k, lin in lins.items()]
        run = lambda h: layer(h, position_ids=pos, position_embeddings=rotary(h, pos))  # noqa: E731
        for h in inps:
            run(h)
        for hd in handles:
            hd.remove()
        for k, lin in lins.items():
            metric = lin.weight.abs() * torch.sqrt(scaler[k])[None, :]  # (out, in)
            groups = metric.view(metric.shape[0], -1, m)  # (out, in/m, m)
            drop = torch.zeros_like(groups, dtype=torch.bool)
            drop.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False)[1], True)
            lin.weight[drop.view_as(metric)] = 0
        inps = [run(h) for h in inps]
        inps = [h[0] if isinstance(h, tuple) else h for h in inps]


@pytest.mark.parametrize("scheme", ["2:4", "4:8"])
def test_wanda_masks_equal_the_official_procedure(tmp_path, scheme):
    src = make_tiny("llama", tmp_path / "llama")
    calib = CalibConfig(samples=6, seq_len=48, seed=1, batch_size=2)
    sparsify.prune(str(src), PruneConfig(method="wanda", scheme=scheme, calib=calib), tmp_path / "out")
    ours = sparsify.load(tmp_path / "out")[0].model
    loaded = load_model(resolve(str(src)))
    ref = loaded.model.float().eval()
    batches = build_batches("text", calib, tokenizer=loaded.tokenizer)
    samples = [ids for b in batches for ids in b["input_ids"]]  # (seq,) each
    n, m = map(int, scheme.split(":"))
    with torch.no_grad():
        _official_style_wanda(ref, samples, n, m)
    ref_w = {k: v.weight for k, v in ref.named_modules() if isinstance(v, torch.nn.Linear) and ".layers." in k}
    ours_w = {k: v.dense_weight() for k, v in ours.named_modules() if hasattr(v, "dense_weight")}
    assert ref_w.keys() == ours_w.keys() and len(ref_w) == 14
    differ = sum(int(((ref_w[k] != 0) != (ours_w[k] != 0)).sum()) for k in ref_w)
    total = sum(w.numel() for w in ref_w.values())
    assert differ <= 1e-3 * total, (differ, total)
    ids = samples[0][None]
    with torch.no_grad():
        a, b = ref(ids).logits, ours(ids).logits  # (1, seq, vocab)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-3 * a.abs().max().item())
