"""Double Sparsity: the sparse attention against a slow per-query reference, exactness when k covers the
context, dense first layers, the channel calibration against brute-force means, decode steps against
the full-sequence simulation, the artifact round trip with generate(), passkey, options and accounting."""
from __future__ import annotations

import math

import pytest
import torch

from sparsify.attention import ds_runtime
from sparsify.attention.accounting import kv_bytes
from sparsify.attention.double_sparsity import DoubleSparsityConfig, collect_stats, parse_amount, rank_channels
from sparsify.errors import UserError


def _ref_code(v: float, lo: float, hi: float, bits: int, channel: bool) -> float:
    """One value as stored: asymmetric round-to-nearest, clipped. Per token over [min(lo, 0), max(hi, 0)]
    with an integer zero point; per channel over exactly [lo, hi] (zero point -lo / scale)."""
    qmax = 2 ** bits - 1
    if not channel:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / qmax if hi > lo else 1.0
    zero = -lo / scale if channel else min(max(round(-lo / scale), 0), qmax)
    return (min(max(round(v / scale + zero), 0), qmax) - zero) * scale


def _ref_quant(x: torch.Tensor, bits: int, grid=None) -> torch.Tensor:
    """One token's labels (r,) as stored: fp16; or on the token's own range; or, with ``grid`` (2, r), on each
    channel's calibrated range."""
    if bits == 16:
        return x.half().float()
    if grid is None:
        return torch.tensor([_ref_code(float(v), float(x.min()), float(x.max()), bits, False) for v in x])
    return torch.tensor([_ref_code(float(v), float(grid[0, c]), float(grid[1, c]), bits, True)
                         for c, v in enumerate(x)])


def _reference(q, k, v, channels, cfg: DoubleSparsityConfig, scaling: float, grid=None) -> torch.Tensor:
    """Per query: label scores, sink + recent + top-k, softmax over the selected tokens. (B, Tq, H, D).
    ``grid`` (2, kv, r): per-channel label ranges."""
    b, heads, tq, d = q.shape
    kv, tk = k.shape[1], k.shape[2]
    g = heads // kv
    r = channels.shape[1]
    out = torch.zeros(b, tq, heads, d)
    for bi in range(b):
        labels = [[_ref_quant(k[bi, j, t, channels[j]], cfg.label_bits, None if grid is None else grid[:, j])
                   for t in range(tk)] for j in range(kv)]
        for i in range(tq):
            ctx = list(range(tk - tq + i + 1))  # causal: the query is position tk - tq + i
            budget = cfg.tokens if isinstance(cfg.tokens, int) else math.ceil(cfg.tokens * len(ctx))
            fixed = [t for n, t in enumerate(ctx) if n < cfg.sink or len(ctx) - n <= cfg.recent]
            for h in range(heads):
                j = h // g
                group = range(j * g, (j + 1) * g)
                approx = {hh: {t: float(q[bi, hh, i, channels[j]] @ labels[j][t]) / math.sqrt(r) for t in ctx}
                          for hh in group}
                rest = [t for t in ctx if t not in fixed]
                heavy = max(0, budget - len(fixed))
                if cfg.select == "head":
                    picked = sorted(rest, key=lambda t: -approx[h][t])[:heavy]
                elif cfg.select == "sum":
                    picked = sorted(rest, key=lambda t: -sum(approx[hh][t] for hh in group))[:heavy]
                elif cfg.select == "max":  # the best log-probability under any head, softmax over the context
                    lse = {hh: torch.logsumexp(torch.tensor([approx[hh][t] for t in ctx]) * math.sqrt(r) * scaling, 0)
                           for hh in group}
                    best = {t: max(float(approx[hh][t] * math.sqrt(r) * scaling - lse[hh]) for hh in group)
                            for t in rest}
                    own = {t for hh in group for t in sorted(rest, key=lambda t: -approx[hh][t])[:heavy // (2 * g)]}
                    picked = (sorted(own) + sorted(set(rest) - own, key=lambda t: -best[t]))[:heavy]
                else:  # union: head by head, round by round, each head's next best token not yet taken
                    ranking = {hh: sorted(rest, key=lambda t: -approx[hh][t]) for hh in group}
                    picked = []
                    for place in range(len(rest)):
                        for hh in group:
                            if len(picked) < heavy and ranking[hh][place] not in picked:
                                picked.append(ranking[hh][place])
                chosen = fixed + picked
                s = torch.stack([q[bi, h, i] @ k[bi, j, t] for t in chosen]) * scaling
                p = torch.softmax(s, 0)
                out[bi, i, h] = sum(p[n] * v[bi, j, t] for n, t in enumerate(chosen))
    return out


def _qkv(b=2, heads=4, kv=2, tq=14, tk=14, d=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, heads, tq, d, generator=g), torch.randn(b, kv, tk, d, generator=g),
            torch.randn(b, kv, tk, d, generator=g))


def _ranges(layers=4, kv=2, d=16, seed=0):
    """{layer: (2, kv, d)} seeded channel ranges [min; max] of about 2 standard normals (some keys clip)."""
    g = torch.Generator().manual_seed(seed)
    return {i: torch.stack([-2 * torch.rand(kv, d, generator=g), 2 * torch.rand(kv, d, generator=g)])
            for i in range(layers)}


@pytest.mark.parametrize("cfg", [
    DoubleSparsityConfig(tokens=6, channels=4, label_bits=4, sink=1, recent=2, label_scale="token"),
    DoubleSparsityConfig(tokens=6, channels=4, label_bits=4, sink=1, recent=2),
    DoubleSparsityConfig(tokens=7, channels=5, label_bits=4, sink=1, recent=1, select="sum"),
    DoubleSparsityConfig(tokens=6, channels=4, label_bits=4, sink=1, recent=1, select="max"),
    DoubleSparsityConfig(tokens=11, channels=4, label_bits=4, sink=1, recent=1, select="max"),
    DoubleSparsityConfig(tokens=0.3, channels=3, label_bits=16, sink=0, recent=0, select="max"),
    DoubleSparsityConfig(tokens=5, channels=6, label_bits=8, sink=2, recent=1, select="head", label_scale="token"),
    DoubleSparsityConfig(tokens=0.4, channels=3, label_bits=16, sink=0, recent=1),
    DoubleSparsityConfig(tokens=4, channels=16, label_bits=16, sink=0, recent=0, select="sum"),
], ids=["union-4bit-token", "union-4bit-channel", "sum-4bit-channel", "max-4bit-channel", "max-own-4bit-channel", "max-fraction-16bit",
        "head-8bit-token", "union-fraction-16bit",
        "sum-all-channels"])
def test_sparse_attention_matches_slow_reference(cfg):
    q, k, v = _qkv()
    channels = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(j))[:cfg.channel_count(16)]
                            for j in range(2)])  # (kv, r)
    grid = torch.gather(_ranges(1)[0], 2, channels[None].expand(2, *channels.shape)) if cfg.needs_ranges else None
    allowed = ds_runtime.allowed_keys(None, 2, 14, 14, "cpu")
    got = ds_runtime.sparse_attention(q, k, v, allowed, channels, cfg, 0.25, chunk=5, label_range=grid)  # chunks 5, 5, 4
    torch.testing.assert_close(got, _reference(q, k, v, channels, cfg, 0.25, grid), rtol=1e-4, atol=1e-5)


def test_a_per_channel_grid_without_its_ranges_is_a_user_error():
    model = _llama()
    with pytest.raises(UserError, match="calibrated channel ranges.*--ds-label-scale token"):
        ds_runtime.install(model, _rankings(), DoubleSparsityConfig(tokens=8, channels=4, sink=1, recent=2))
    assert not ds_runtime.installed(model) and model.config._attn_implementation == "sdpa"
    ds_runtime.install(model, _rankings(), DoubleSparsityConfig(tokens=8, channels=4, sink=1, recent=2,
                                                                label_scale="token"))  # per token: no ranges needed
    assert ds_runtime.installed(model)


def test_max_selection_keeps_each_heads_own_best_before_the_most_probable():
    """Head 0 is nearly flat (its best, token 11, has probability ~1/12); head 1 puts ~1/5 on each of tokens
    0-4. By probability alone head 1 would take all 4 slots; each head's own best 4 // (2 * 2) = 1 comes first."""
    approx = torch.zeros(1, 1, 2, 1, 12)  # (B, KV, g, Tq, Tk)
    approx[0, 0, 0, 0] = torch.linspace(0, 0.1, 12)
    approx[0, 0, 1, 0, :5] = torch.tensor([5.0, 4.9, 4.8, 4.7, 4.6])
    allowed = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    cfg = DoubleSparsityConfig(tokens=4, channels=4, sink=0, recent=0, select="max")
    chosen = ds_runtime.select_tokens(approx, allowed, cfg)  # (1, 1, 1, 1, 12)
    assert chosen[0, 0, 0, 0].nonzero().flatten().tolist() == [0, 1, 2, 11]
    by_probability = ds_runtime.max_probability(approx, allowed[:, None], 1.0)[0, 0, 0, 0]
    assert by_probability.topk(4).indices.sort().values.tolist() == [0, 1, 2, 3]  # what the guard changes


def test_decode_rows_over_a_longer_cache_match_the_reference():
    """Queries that are the last 3 positions of 12 (a decode step of 3 tokens over a cache)."""
    q, k, v = _qkv(tq=3, tk=12, seed=3)
    cfg = DoubleSparsityConfig(tokens=5, channels=4, label_bits=4, sink=1, recent=1, label_scale="token")
    channels = torch.tensor([[0, 3, 5, 7], [15, 2, 9, 1]])
    got = ds_runtime.sparse_attention(q, k, v, ds_runtime.allowed_keys(None, 2, 3, 12, "cpu"), channels, cfg, 0.25)
    torch.testing.assert_close(got, _reference(q, k, v, channels, cfg, 0.25), rtol=1e-4, atol=1e-5)


def test_masks_of_every_kind_give_the_same_context():
    """None (causal), a 2-D padding mask of ones, a 4-D bool and a 4-D additive float mask agree."""
    causal = ds_runtime.allowed_keys(None, 2, 4, 6, "cpu")  # (2, 1, 4, 6)
    assert causal[0, 0, 0].tolist() == [True, True, True, False, False, False]
    assert torch.equal(ds_runtime.allowed_keys(torch.ones(2, 6, dtype=torch.long), 2, 4, 6, "cpu"), causal)
    assert torch.equal(ds_runtime.allowed_keys(causal.clone(), 2, 4, 6, "cpu"), causal)
    additive = torch.zeros(2, 1, 4, 6).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert torch.equal(ds_runtime.allowed_keys(additive, 2, 4, 6, "cpu"), causal)


def _llama(layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _rankings(layers=4, kv=2, d=16):
    return {i: torch.stack([torch.randperm(d, generator=torch.Generator().manual_seed(10 * i + j)) for j in range(kv)])
            for i in range(layers)}


@torch.no_grad()
def test_k_covering_the_context_is_dense_attention_and_first_layers_stay_dense():
    model = _llama()
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    outs = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for i, layer in enumerate(model.model.layers)]
    dense_logits = model(input_ids=ids).logits
    dense = dict(outs)
    ds_runtime.install(model, _rankings(), DoubleSparsityConfig(tokens=40, channels=4, sink=2, recent=4), _ranges())
    assert model.config._attn_implementation == "sparsify_ds_sdpa"
    torch.testing.assert_close(model(input_ids=ids).logits, dense_logits, rtol=1e-5, atol=1e-5)
    ds_runtime.install(model, _rankings(), DoubleSparsityConfig(tokens=8, channels=4, sink=1, recent=2), _ranges())
    sparse_logits = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    for i in (0, 1):
        assert torch.equal(outs[i], dense[i]), i  # the first two layers are untouched, bit for bit
    assert not torch.allclose(outs[2], dense[2], atol=1e-4)
    torch.testing.assert_close(sparse_logits[:, :8], dense_logits[:, :8], rtol=1e-5, atol=1e-5)  # context <= k
    ds_runtime.uninstall(model)
    assert model.config._attn_implementation == "sdpa" and not ds_runtime.installed(model)


@torch.no_grad()
def test_generate_decode_steps_match_the_full_sequence_simulation():
    """Greedy tokens from generate() (one query over the cache per step) equal the argmax of one forward
    over the whole sequence (every position its own selection): the two paths select alike."""
    model = _llama()
    ds_runtime.install(model, _rankings(), DoubleSparsityConfig(tokens=10, channels=4, sink=1, recent=3), _ranges())
    prompt = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                         pad_token_id=0)
    full = model(input_ids=out).logits.argmax(-1)  # (1, 42)
    assert torch.equal(out[0, 30:], full[0, 29:-1])


def _brute_force_means(model, batches):
    """Per layer: mean over tokens of |q_c k_c| (query heads pooled per kv head), |q_c|, |k_c| after rotary."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    sums = {i: {s: torch.zeros(kv, d) for s in ("qk", "q", "k")} for i in range(cfg.num_hidden_layers)}
    tokens = 0
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch, output_hidden_states=True).hidden_states
            b, t = batch["input_ids"].shape
            for i, layer in enumerate(model.model.layers):
                x = layer.input_layernorm(hidden[i])
                cos, sin = model.model.rotary_emb(x, torch.arange(t)[None])
                q = layer.self_attn.q_proj(x).view(b, t, heads, d).transpose(1, 2)
                k = layer.self_attn.k_proj(x).view(b, t, kv, d).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                for h in range(heads):
                    sums[i]["qk"][h // (heads // kv)] += (q[:, h] * k[:, h // (heads // kv)]).abs().sum((0, 1))
                    sums[i]["q"][h // (heads // kv)] += q[:, h].abs().sum((0, 1))
                for j in range(kv):
                    sums[i]["k"][j] += k[:, j].abs().sum((0, 1))
            tokens += b * t
    group = heads // kv
    return {i: {"qk": s["qk"] / (tokens * group), "q": s["q"] / (tokens * group), "k": s["k"] / tokens}
            for i, s in sums.items()}


def test_channel_ranking_matches_brute_force_means():
    model = _llama(layers=3)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 96, (2, 12), generator=g)} for _ in range(2)]
    stats = collect_stats(model, batches)
    expected = _brute_force_means(model, batches)
    for i in range(3):
        means = stats[i].means()
        for s in ("qk", "q", "k"):
            torch.testing.assert_close(means[s], expected[i][s], rtol=1e-4, atol=1e-6)
            ranking = rank_channels(stats[i], s)  # (kv, d): most important first by the brute-force means too
            assert torch.equal(ranking.sort(-1).values, torch.arange(16).expand(2, 16))
            ordered = expected[i][s].gather(-1, ranking)  # (kv, d) non-increasing up to float rounding
            assert bool((ordered[:, :-1] >= ordered[:, 1:] - 1e-6).all()), (i, s)
        random = rank_channels(stats[i], "random", layer=i, seed=3)
        assert torch.equal(random.sort(-1).values, torch.arange(16).expand(2, 16))  # a permutation per kv head
        assert torch.equal(random, rank_channels(stats[i], "random", layer=i, seed=3))  # seeded


def test_prune_load_generate_on_tiny_llama(tmp_path):
    import sparsify
    from sparsify.config import CalibConfig, PruneConfig
    from tiny_models import make_tiny

    src = make_tiny("llama", tmp_path / "llama")
    ds = DoubleSparsityConfig(tokens=12, channels=0.25, statistic="auto", sink=1, recent=2, dense_layers=1, holdout=2)
    manifest = sparsify.prune(str(src), PruneConfig(method="none", attention=ds,
                                                   calib=CalibConfig(samples=4, seq_len=48, batch_size=2)),
                              tmp_path / "out")
    section = manifest["attention"]
    assert section["statistic"] in ("qk", "q", "k") and set(section["selection"]["losses"]) == {"qk", "q", "k"}
    assert section["channels"] == 4 and section["dense_blocks"] == [0] and manifest["tensors"] == {}
    assert manifest["totals"]["sparsity"] == 0.0
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert stored["ds.layers.1.channels"].dtype == torch.int16
    assert stored["ds.layers.1.channels"].shape == (2, 16)
    source = load_file(src / "model.safetensors")
    assert all(torch.equal(stored[n], t) for n, t in source.items())  # --method none: weights unchanged
    loaded, _ = sparsify.load(tmp_path / "out")
    assert ds_runtime.installed(loaded.model) and loaded.model.model.layers[0].self_attn._sparsify_ds.channels is None
    assert torch.equal(loaded.model.model.layers[1].self_attn._sparsify_ds.channels,
                       stored["ds.layers.1.channels"][:, :4].long())
    grid = stored["ds.layers.1.label_range"]  # (2, kv, head_dim): the calibrated range of every key channel
    assert grid.dtype == torch.float32 and grid.shape == (2, 2, 16) and bool((grid[0] <= grid[1]).all())
    chosen = stored["ds.layers.1.channels"][:, :4].long()
    assert torch.equal(loaded.model.model.layers[1].self_attn._sparsify_ds.label_range,
                       torch.gather(grid, 2, chosen[None].expand(2, 2, 4)))
    from sparsify.attention.artifact import take_calibration

    incomplete = {k: v for k, v in stored.items() if k != "ds.layers.1.label_range"}
    with pytest.raises(UserError, match="lacks ds.layers.1.label_range.*re-run 'sparsify prune'"):
        take_calibration(manifest, incomplete)
    ids = loaded.tokenizer("the value of the", return_tensors="pt").input_ids
    out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                                pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 20
    result = sparsify.evaluate(str(tmp_path / "out"), task="passkey", seq_len=128, trials=2, auto_baseline=False)
    assert result["passkey"]["trials"] == 2 and 0 <= result["passkey"]["accuracy"] <= 1
    assert len(result["passkey"]["results"]) == 2 and result["attention"]["kv_bytes"]["context"] == 128


@pytest.mark.parametrize("text,flag,expected", [("1/4", True, 0.25), ("0.0625", True, 0.0625), ("128", True, 128),
                                                ("1", True, 1), ("1.0", False, 1.0)])
def test_parse_amount(text, flag, expected):
    assert parse_amount(text, "--x", allow_count=flag) == expected


@pytest.mark.parametrize("kwargs,match", [
    ({"channels": "abc"}, "--ds-channels 'abc'"), ({"channels": "3/2"}, "--ds-channels"),
    ({"tokens": "0"}, "--ds-tokens"), ({"label_bits": 2}, "--ds-label-bits 2"),
    ({"statistic": "qq"}, "--ds-statistic 'qq'"), ({"tokens": 30, "sink": 4, "recent": 26}, "no room"),
    ({"label_scale": "row"}, "--ds-label-scale 'row'"), ({"select": "all"}, "--ds-select 'all'"),
])
def test_bad_options_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        DoubleSparsityConfig(**kwargs)
    with pytest.raises(UserError, match="exceeds the head size"):
        DoubleSparsityConfig(channels=80).channel_count(64)


def test_kv_bytes_at_one_sixteenth_on_smollm2_shapes():
    """128 of 2048 tokens, 16 of 64 channels at 4 bits, fp16 cache, one selection per kv head."""
    shape = {"blocks": 30, "heads": 9, "kv_heads": 3, "head_dim": 64}
    kv = kv_bytes(shape, DoubleSparsityConfig(tokens=128, channels=16, label_bits=4), 2048)
    layer = kv["per_sparse_layer"]
    assert layer["dense"] == 3 * 2048 * 64 * 2 * 2
    assert layer["labels"] == 3 * 2048 * 8 and layer["label_meta"] == 3 * 16 * 2 * 4  # the fp32 per-channel grid
    assert layer["gather"] == 3 * 128 * 64 * 2 * 2
    assert layer["ratio_without_meta"] == pytest.approx(1 / 32 + 1 / 16)
    assert layer["ratio"] == pytest.approx(1 / 32 + 1 / 16 + 384 / layer["dense"]) and layer["ratio"] <= 1 / 10
    token = kv_bytes(shape, DoubleSparsityConfig(tokens=128, channels=16, label_bits=4, label_scale="token"), 2048)
    assert token["per_sparse_layer"]["label_meta"] == 3 * 2048 * 4  # fp16 scale + zero per token
    assert token["per_sparse_layer"]["ratio"] == pytest.approx(1 / 32 + 1 / 64 + 1 / 16)
    assert kv["token_sparsity"] == kv["label_sparsity"] == 1 / 16
    assert kv["model"]["ratio"] == pytest.approx((2 + 28 * layer["ratio"]) / 30)
    per_head = kv_bytes(shape, DoubleSparsityConfig(tokens=128, channels=16, label_bits=4, select="head"), 2048)
    assert kv_bytes(shape, DoubleSparsityConfig(tokens=128, channels=16, label_bits=4, select="sum"),
                    2048)["per_sparse_layer"] == layer
    assert per_head["per_sparse_layer"]["gather"] == 3 * layer["gather"]  # 9 query heads read their own rows


@pytest.mark.parametrize("family", ["gpt2", "falcon", "gemma2", "mixtral"])
@torch.no_grad()
def test_other_architectures_run_and_are_exact_when_k_covers_the_context(family):
    """Conv1D GPT-2 (no rotary), Falcon (fused qkv), Gemma-2 (softcap, sliding window 8), Mixtral (MoE)."""
    import transformers
    from tiny_models import CLASSES, _config

    torch.manual_seed(0)
    model = getattr(transformers, CLASSES[family])(_config(family)).eval()
    layers = ds_runtime.attention_layers(model)
    kv = layers[0].config.num_key_value_heads if family != "gpt2" else 4
    channels = {i: torch.stack([torch.randperm(layers[0].head_dim) for _ in range(kv)]) for i in range(len(layers))}
    ranges = _ranges(len(layers), kv, layers[0].head_dim)
    ids = torch.randint(5, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    dense = model(input_ids=ids).logits
    ds_runtime.install(model, channels, DoubleSparsityConfig(tokens=64, channels=4, sink=1, recent=2, dense_layers=0),
                       ranges)
    torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=1e-5, atol=1e-5)
    ds_runtime.install(model, channels, DoubleSparsityConfig(tokens=6, channels=4, sink=1, recent=2, dense_layers=0),
                       ranges)
    assert not torch.allclose(model(input_ids=ids).logits, dense, atol=1e-3)
    assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 27)
