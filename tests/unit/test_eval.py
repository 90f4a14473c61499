"""Evaluation metrics against hand-computed references, report files, info table."""
from __future__ import annotations

import math

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from sparsify.eval.agreement import embedding_cosine, logit_agreement
from sparsify.eval.perplexity import perplexity
from sparsify.eval.report import write_report
from sparsify.eval.size import weight_sparsity


def _llama(seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def test_perplexity_matches_slow_loop():
    model, windows = _llama(0), torch.randint(0, 64, (3, 9))
    got = perplexity(model, windows, batch_size=2)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0]
            for t in range(len(w) - 1):
                nll -= torch.log_softmax(logits[t].double(), -1)[w[t + 1]].item()
                n += 1
    assert got["tokens"] == n == 24 and got["windows"] == 3 and got["seq_len"] == 9
    assert math.isclose(got["perplexity"], math.exp(nll / n), rel_tol=1e-5)


def test_logit_agreement_by_hand():
    a, b = _llama(0), _llama(1)
    batch = {"input_ids": torch.randint(0, 64, (2, 5))}
    r = logit_agreement(a, b, [batch])
    with torch.no_grad():
        p, q = b(**batch).logits.double(), a(**batch).logits.double()
    kl = sum(torch.sum(torch.softmax(p[i, t], -1) * (torch.log_softmax(p[i, t], -1) - torch.log_softmax(q[i, t], -1))).item()
             for i in range(2) for t in range(5)) / 10
    top1 = sum(int(p[i, t].argmax() == q[i, t].argmax()) for i in range(2) for t in range(5)) / 10
    assert math.isclose(r["kl"], kl, rel_tol=1e-4) and r["top1"] == top1
    assert logit_agreement(a, a, [batch])["top1"] == 1.0


def test_embedding_cosine_uses_masked_mean_pooling():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    a, b = BertModel(cfg).eval(), BertModel(cfg).eval()
    batch = {"input_ids": torch.randint(0, 64, (2, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 3 + [0] * 3])}
    with torch.no_grad():
        ha, hb = a(**batch).last_hidden_state, b(**batch).last_hidden_state
    pooled = lambda h: torch.stack([h[0].mean(0), h[1, :3].mean(0)])  # noqa: E731
    want = torch.nn.functional.cosine_similarity(pooled(ha), pooled(hb)).mean().item()
    assert math.isclose(embedding_cosine(a, b, [batch])["cosine"], want, rel_tol=1e-5)


def test_sparsity_and_report(tmp_path):
    w = {"a": torch.tensor([[0.0, 1.0], [2.0, 0.0]]), "b": torch.ones(2, 2)}
    s = weight_sparsity(w)
    assert s["layers"]["a"]["sparsity"] == 0.5 and s["sparsity"] == 0.25
    files = write_report({"model": "m", "size": s}, tmp_path / "rep")
    assert [f.name for f in files] == ["eval.json", "sparsity.png"] and all(f.stat().st_size > 0 for f in files)
