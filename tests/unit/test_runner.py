"""The block-by-block runner against direct computations on tiny random models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsify import registry
from sparsify.calibrate import runner
from sparsify.calibrate.capture import Call, capture
from sparsify.calibrate.stats import ColumnNorm, Hessian
from sparsify.errors import UserError
from sparsify.models.layout import find_blocks, find_targets


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, sliding_window=4, max_position_embeddings=64)
    return Gemma2ForCausalLM(cfg).eval()


def _batches(n=2, t=12, vocab=96):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (2, t), generator=g)} for _ in range(n)]


def _targets(model):
    return {b: {n: model.get_submodule(n) for n in names} for b, names in find_targets(model).items()}


def _make_acc(kind, n):
    return registry.ACCUMULATORS[kind](n)


def test_capture_records_each_blocks_own_kwargs_gemma2():
    """Gemma-2 alternates sliding-window and full attention: block 1 must not reuse block 0's mask."""
    model = _gemma2()
    (prefix, layers), = find_blocks(model)
    hidden, calls = capture(model, layers, _batches(1), "cpu", "cpu")
    m0, m1 = calls[0][0].kwargs["attention_mask"], calls[1][0].kwargs["attention_mask"]
    assert model.config.layer_types[0] != model.config.layer_types[1]
    assert not torch.equal(m0, m1)  # a sliding window of 4 over 12 tokens masks more than the causal mask


@pytest.mark.parametrize("make", [_llama, _gemma2])
def test_dense_pass_reproduces_the_models_hidden_states(make):
    """Running block by block on captured inputs gives every block the input the whole model gives it."""
    model = _llama() if make is _llama else _gemma2()
    batches = _batches()
    targets = _targets(model)
    blocks = find_blocks(model)
    seen = {}

    def on_block(block_targets, stats, _observed):
        first = next(iter(block_targets))
        seen[first] = stats[first]

    kinds = {n: "colnorm" for mods in targets.values() for n in mods}
    runner.run(model, blocks, targets, batches, kinds, _make_acc, on_block)
    with torch.no_grad():
        states = [model(**b, output_hidden_states=True).hidden_states for b in batches]
    for i, (block, mods) in enumerate(targets.items()):
        first = next(iter(mods))  # q_proj reads input_layernorm(hidden state i)
        norm = model.get_submodule(f"{block}.input_layernorm")
        ref = ColumnNorm(32)
        for s in states:
            ref.add_batch(norm(s[i]))
        torch.testing.assert_close(seen[first].norms(), ref.norms(), rtol=1e-5, atol=1e-6)


def test_shared_accumulators_and_inputs_recomputed_after_pruning():
    """q/k/v share one Hessian and gate/up another; block 1's statistics see block 0 as pruned."""
    model = _llama()
    batches = _batches()
    targets = _targets(model)
    got = {}

    def on_block(block_targets, stats, _observed):
        got.update(stats)
        for m in block_targets.values():  # "prune" block by zeroing half of every weight
            m.weight.data[:, ::2] = 0

    kinds = {n: "hessian" for mods in targets.values() for n in mods}
    runner.run(model, find_blocks(model), targets, batches, kinds, _make_acc, on_block)
    b0 = "model.layers.0"
    assert got[f"{b0}.self_attn.q_proj"] is got[f"{b0}.self_attn.k_proj"] is got[f"{b0}.self_attn.v_proj"]
    assert got[f"{b0}.mlp.gate_proj"] is got[f"{b0}.mlp.up_proj"]
    assert got[f"{b0}.self_attn.o_proj"] is not got[f"{b0}.self_attn.q_proj"]
    assert len({id(a) for a in got.values()}) == 4 * 3
    # reference: the model after all blocks were pruned, hidden state 1 is block 0's pruned output
    with torch.no_grad():
        ref = Hessian(32)
        for b in batches:
            h = model(**b, output_hidden_states=True).hidden_states[1]
            ref.add_batch(model.model.layers[1].input_layernorm(h))
    torch.testing.assert_close(got["model.layers.1.self_attn.q_proj"].H, ref.H, rtol=1e-4, atol=1e-6)


def test_nan_activations_name_the_block():
    model = _llama()
    model.model.layers[1].mlp.down_proj.bias = nn.Parameter(torch.full((32,), float("nan")))
    targets = _targets(model)
    kinds = {n: "colnorm" for mods in targets.values() for n in mods}
    with pytest.raises(UserError, match=r"NaN/inf at the output of model\.layers\.1"):
        runner.run(model, find_blocks(model), targets, _batches(), kinds, _make_acc, lambda *a: None)


def test_qk_observer_matches_rotary_queries_and_keys():
    """Queries and keys after rotary embedding, pooled per key-value head, against a direct computation."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from sparsify.calibrate.observers import qk_observer

    model = _llama()
    batches = _batches()
    observed = {}
    targets = _targets(model)
    kinds = {n: None for mods in targets.values() for n in mods}

    def on_block(block_targets, _stats, obs):
        observed[next(iter(block_targets)).rsplit(".", 2)[0]] = obs["qk"]["self_attn"]

    runner.run(model, find_blocks(model), targets, batches, kinds, _make_acc, on_block, observers={"qk": qk_observer})
    assert model.config._attn_implementation != "sparsify_observe"  # restored
    layer = 1
    attn = model.model.layers[layer].self_attn
    qk = torch.zeros(2, 8)
    tokens = 0
    with torch.no_grad():
        for b in batches:
            hs = model(**b, output_hidden_states=True).hidden_states[layer]
            x = model.model.layers[layer].input_layernorm(hs)
            pos = torch.arange(x.shape[1])[None]
            cos, sin = model.model.rotary_emb(x, pos)
            q = attn.q_proj(x).view(2, -1, 4, 8).transpose(1, 2)  # (b, H, T, d)
            k = attn.k_proj(x).view(2, -1, 2, 8).transpose(1, 2)  # (b, KV, T, d)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            for h in range(4):  # slow loop: query head h reads kv head h // 2
                qk[h // 2] += (q[:, h] * k[:, h // 2]).abs().sum((0, 1))
            tokens += x.shape[0] * x.shape[1]
    stats = observed[f"model.layers.{layer}"]
    assert stats.tokens == tokens
    torch.testing.assert_close(stats.means()["qk"], qk / (tokens * 2), rtol=1e-4, atol=1e-6)


def test_statistics_pass_stops_after_the_last_target_yet_sees_every_batch():
    """From the second batch on, the pass stops at down_proj's input: its product never runs, and every
    Hessian still equals one accumulated from whole-model forwards."""
    model = _llama()
    batches = _batches(n=3)
    targets = _targets(model)
    kinds = {n: "hessian" for mods in targets.values() for n in mods}
    got, ran = {}, []
    down = model.model.layers[1].mlp.down_proj
    handle = down.register_forward_hook(lambda *_: ran.append(1))
    runner.run(model, find_blocks(model), targets, batches, kinds, _make_acc, lambda t, s, o: got.update(s))
    handle.remove()
    assert len(ran) == 1 + len(batches)  # statistics: batch 0 only; then the output pass: every batch
    refs = {n: Hessian(m.in_features) for n, m in targets["model.layers.1"].items()}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: refs[n].add_batch(i[0]))
             for n, m in targets["model.layers.1"].items()]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    for n, ref in refs.items():
        assert got[n].tokens == ref.tokens == 3 * 2 * 12
        torch.testing.assert_close(got[n].H, ref.H, rtol=1e-4, atol=1e-6)


class _Twice(nn.Module):
    """A block that calls its last Linear twice: the statistics pass must not stop at the first call."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.a(self.b(self.a(x)))


def test_statistics_pass_runs_whole_forwards_when_a_target_runs_twice():
    torch.manual_seed(0)
    block, xs = _Twice(), [torch.randn(2, 5, 8) for _ in range(3)]
    calls = [Call(True, (), {})] * 3
    targets = {"a": block.a, "b": block.b}
    stats, _ = runner.statistics(block, "blk", targets, {"a": "colnorm", "b": "colnorm"}, _make_acc, {}, xs, calls,
                                 "cpu")
    with torch.no_grad():
        inner = [block.a(x) for x in xs]
        ref_b = torch.cat([h.reshape(-1, 8) for h in inner])
        ref_a = torch.cat([torch.cat([x, block.b(h)]).reshape(-1, 8) for x, h in zip(xs, inner)])
    assert stats["a"].tokens == ref_a.shape[0] and stats["b"].tokens == ref_b.shape[0]
    torch.testing.assert_close(stats["a"].sumsq, (ref_a ** 2).sum(0))
    torch.testing.assert_close(stats["b"].sumsq, (ref_b ** 2).sum(0))
