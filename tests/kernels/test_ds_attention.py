"""Double Sparsity decode kernels (interpreter) against the references and independent slow paths.

Tolerances, from the arithmetic:
- scores are fp32 in every case (inputs of any dtype convert to fp32 exactly): kernel and reference
  sum the same R <= 16 products in another order (the kernel applies a quantized label's scale after
  the sum), each sum off by at most R * 2**-24 of sum|q * l|: 1e-5 relative / absolute.
- attention, fp32: the online softmax rescales by exp(m_old - m_new) once per chunk of 16 (at most 3
  here), a few fp32 ulps on each weight of a convex combination of V rows: 2e-5. fp16 / bf16 round
  that fp32 result once: one fp16 ulp (2**-10, 2e-3) and two bf16 ulps (1.6e-2: the interpreter
  truncates fp32 -> bf16).
- quantized labels vs the float labels they came from: with per-token round-to-nearest codes each
  dequantized channel is off by at most one step (scale; the clamp at the range's end can add half
  a step to the half-step rounding), so |score error| <= sum_c |q_c| * scale_t / sqrt(R); with a
  per-channel grid (a float zero point) the same holds against the labels clipped to the grid's range,
  with scale_c.
- per-channel grids are folded into q (q_c * scale_c, minus the constant (q * scale) . zero): the sum
  of R terms each at most |q_c| scale_c (2**bits - 1) in magnitude, plus the constant, at most
  |q_c| scale_c |zero_c| each, is off by at most 2 R 2**-24 times their magnitude.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from sparsify.errors import UserError
from sparsify.kernels import reference as R
from sparsify.kernels.triton.ds_attention import gather_attention, kv_bytes_read, label_scores

SCORE_TOL = {"rtol": 1e-5, "atol": 1e-5}
TOL = {torch.float32: {"rtol": 2e-5, "atol": 2e-5}, torch.float16: {"rtol": 2e-3, "atol": 2e-3},
       torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2}}
# (B, H, KVH, T): SmolLM2's GQA 9/3 with one token, T not a multiple of the 64-token tile, MHA at 300, GQA 4:1
HEADS = [(1, 9, 3, 1), (2, 9, 3, 37), (1, 4, 4, 300), (2, 8, 2, 5)]


def _cache(b, h, kvh, t, d, r, seed, dtype=torch.float32):
    """q (B, H, D), K, V (B, KVH, T, D), and each kv head's R label channels (KVH, R)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g).to(dtype) for s in ((b, h, d), (b, kvh, t, d), (b, kvh, t, d)))
    return q, k, v, torch.rand(kvh, d, generator=g).argsort(-1)[:, :r]


def _labels(q, k, channels):
    """q restricted to its kv head's channels (B, H, R) and the label cache K[..., channels] (B, KVH, T, R)."""
    group = q.shape[1] // k.shape[1]
    q_label = torch.stack([q[:, h, channels[h // group]] for h in range(q.shape[1])], 1)
    return q_label, torch.stack([k[:, j][..., channels[j]] for j in range(k.shape[1])], 1)


@pytest.mark.parametrize("b, h, kvh, t", HEADS)
@pytest.mark.parametrize("dtype", list(TOL))
def test_label_scores_float(b, h, kvh, t, dtype):
    q, k, _, ch = _cache(b, h, kvh, t, 48, 12, seed=t + h, dtype=dtype)  # D=48, R=12: neither a power of two
    q_label, labels = _labels(q, k, ch)
    got = label_scores(q_label, labels)
    assert got.shape == (b, h, t) and got.dtype == torch.float32
    torch.testing.assert_close(got, R.ds_label_scores_ref(q_label, labels), **SCORE_TOL)
    group = h // kvh  # independent: per head, the full q and K restricted to the channels, by matmul
    slow = torch.stack([q[:, i, ch[i // group]].float()[:, None, :] @ k[:, i // group][..., ch[i // group]].float()
                        .transpose(1, 2) for i in range(h)], 1)[:, :, 0] / math.sqrt(12)
    torch.testing.assert_close(got, slow, **SCORE_TOL)
    torch.testing.assert_close(label_scores(q_label, labels, scale=0.5), slow * math.sqrt(12) * 0.5, **SCORE_TOL)


@pytest.mark.parametrize("b, h, kvh, t", HEADS)
@pytest.mark.parametrize("bits, r", [(8, 16), (4, 16), (4, 11)])
def test_label_scores_quantized(b, h, kvh, t, bits, r):
    q, k, _, ch = _cache(b, h, kvh, t, 64, r, seed=t + bits + r)
    q_label, labels = _labels(q, k, ch)
    codes, scale, zero = R.ds_quantize_labels_ref(labels, bits)
    assert codes.shape == (b, kvh, t, -(-r // 2) if bits == 4 else r) and codes.dtype == torch.uint8
    counter = torch.zeros(2, dtype=torch.int64)
    got = label_scores(q_label, codes, label_scale=scale, label_zero=zero, bits=bits, counter=counter)
    want = R.ds_label_scores_ref(q_label, codes, label_scale=scale, label_zero=zero, bits=bits)
    torch.testing.assert_close(got, want, **SCORE_TOL)
    exact = R.ds_label_scores_ref(q_label, labels)  # the float labels the codes came from
    bound = q_label.abs().sum(-1)[..., None] * scale.repeat_interleave(h // kvh, 1) / math.sqrt(r)  # (B, H, T)
    assert bool(((got - exact).abs() <= bound * 1.001 + 1e-5).all())
    acct = kv_bytes_read(b, h, kvh, t, 64, r, 0, label_bits=bits, label_meta_bytes=8)  # fp32 scale + zero
    assert counter.tolist() == [acct["labels"], acct["label_meta"]]
    g = torch.Generator().manual_seed(r)  # no zero: the symmetric midpoint 2**(bits-1), fp16 scales
    codes = torch.randint(0, 256, codes.shape, generator=g, dtype=torch.uint8)
    scale = torch.rand(b, kvh, t, generator=g).half()
    counter.zero_()
    got = label_scores(q_label, codes, 0.3, label_scale=scale, bits=bits, counter=counter)
    torch.testing.assert_close(got, R.ds_label_scores_ref(q_label, codes, 0.3, label_scale=scale, bits=bits),
                               **SCORE_TOL)
    assert counter.tolist() == [acct["labels"], b * kvh * t * 2]


@pytest.mark.parametrize("b, h, kvh, t", HEADS)
@pytest.mark.parametrize("bits, r", [(8, 16), (4, 16), (4, 11)])
def test_label_scores_per_channel(b, h, kvh, t, bits, r):
    q, k, _, ch = _cache(b, h, kvh, t, 64, r, seed=2 * t + bits + r)
    q_label, labels = _labels(q, k, ch)
    grid_range = torch.stack([labels.amin((0, 2)), labels.amax((0, 2))]) * 0.8  # (2, KVH, R): the extremes clip
    codes, scale, zero = R.ds_quantize_labels_ref(labels, bits, grid_range)
    assert codes.shape == (b, kvh, t, -(-r // 2) if bits == 4 else r) and scale.shape == zero.shape == (kvh, r)
    counter = torch.zeros(2, dtype=torch.int64)
    got = label_scores(q_label, codes, label_scale=scale, label_zero=zero, bits=bits, counter=counter)
    want = R.ds_label_scores_ref(q_label, codes, label_scale=scale, label_zero=zero, bits=bits)
    per_head = scale.repeat_interleave(h // kvh, 0)[None]  # (1, H, R)
    reach = (2 ** bits - 1) + zero.abs().repeat_interleave(h // kvh, 0)[None]  # (1, H, R): |code| + |zero|
    size = (q_label.abs() * per_head * reach).sum(-1, keepdim=True) / math.sqrt(r)  # (B, H, 1)
    assert bool(((got - want).abs() <= 2 * (2 * r * 2 ** -24) * size + 1e-6).all())
    lo, hi = grid_range[0], grid_range[1]  # (KVH, R): a per-channel grid spans exactly the calibrated range
    clipped = torch.maximum(torch.minimum(labels, hi[None, :, None]), lo[None, :, None])  # independent: clip, no rounding
    exact = R.ds_label_scores_ref(q_label, clipped)
    bound = (q_label.abs() * per_head).sum(-1, keepdim=True) / math.sqrt(r)  # (B, H, 1): one step per channel
    assert bool(((got - exact).abs() <= bound * 1.001 + 1e-5).all())
    acct = kv_bytes_read(b, h, kvh, t, 64, r, 0, label_bits=bits, channel_meta_bytes=8)  # fp32 table
    assert acct["label_meta"] == kvh * r * 8
    assert counter.tolist() == [acct["labels"], acct["label_meta"]]
    with pytest.raises(UserError, match="per channel"):
        label_scores(q_label, codes, label_scale=scale[:, :-1], bits=bits)


def _dense_masked(q, k, v, idx, ok, scale):
    """Independent slow path: softmax over all T tokens with -inf outside the selected ones, per head."""
    b, h, d = q.shape
    group = h // k.shape[1]
    out = torch.zeros(b, h, d)
    for i in range(b):
        for j in range(h):
            sel = torch.zeros(k.shape[2], dtype=torch.bool)
            sel[idx[i, j][ok[i, j]].long()] = True
            if sel.any():
                s = (k[i, j // group].float() @ q[i, j].float()) * scale  # (T,)
                out[i, j] = torch.softmax(s.masked_fill(~sel, float("-inf")), 0) @ v[i, j // group].float()
    return out.to(q.dtype)


@pytest.mark.parametrize("b, h, kvh, t, d, k", [(1, 9, 3, 1, 48, 1), (2, 9, 3, 37, 48, 37), (1, 4, 4, 300, 64, 40),
                                                (2, 8, 2, 5, 64, 3)])
@pytest.mark.parametrize("dtype", list(TOL))
def test_gather_attention(b, h, kvh, t, d, k, dtype):
    q, kc, vc, _ = _cache(b, h, kvh, t, d, 1, seed=t + k, dtype=dtype)
    g = torch.Generator().manual_seed(k)
    idx = torch.rand(b, h, t, generator=g).argsort(-1)[..., :k]  # unique per head; heads of a group differ
    got = gather_attention(q, kc, vc, idx)
    assert got.shape == (b, h, d) and got.dtype == dtype
    torch.testing.assert_close(got, R.ds_gather_attention_ref(q, kc, vc, idx), **TOL[dtype])
    ok = torch.ones_like(idx, dtype=torch.bool)
    torch.testing.assert_close(got, _dense_masked(q, kc, vc, idx, ok, d ** -0.5), **TOL[dtype])
    if k == t:  # every token selected: plain attention, torch's own
        sdpa = F.scaled_dot_product_attention(q.float()[:, :, None], kc.float(), vc.float(), enable_gqa=True)
        torch.testing.assert_close(got, sdpa[:, :, 0].to(dtype), **TOL[dtype])


@pytest.mark.parametrize("b, h, kvh, t, d, k", [(1, 9, 3, 1, 48, 1), (2, 9, 3, 37, 48, 20), (2, 8, 2, 70, 64, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gather_attention_shared_per_kv_head(b, h, kvh, t, d, k, dtype):
    """idx (B, KVH, k): the query heads of a kv head share one selection; each row is loaded once for all."""
    q, kc, vc, _ = _cache(b, h, kvh, t, d, 1, seed=3 * t + k, dtype=dtype)
    gen = torch.Generator().manual_seed(k + 1)
    idx = torch.rand(b, kvh, t, generator=gen).argsort(-1)[..., :k].int()  # (B, KVH, k)
    valid = torch.randint(0, k + 1, (b, kvh), generator=gen)
    counter = torch.zeros(2, dtype=torch.int64)
    got = gather_attention(q, kc, vc, idx, valid, counter=counter)
    per_head, per_head_valid = idx.repeat_interleave(h // kvh, 1), valid.repeat_interleave(h // kvh, 1)  # (B, H, k)
    torch.testing.assert_close(got, R.ds_gather_attention_ref(q, kc, vc, per_head, per_head_valid), **TOL[dtype])
    assert counter.tolist() == [int(valid.clamp(max=k).sum()) * d * 2 * kc.element_size(), 0]
    counter.zero_()
    gather_attention(q, kc, vc, idx, counter=counter)
    assert counter.tolist() == [kv_bytes_read(b, h, kvh, t, d, 1, k, kv_itemsize=kc.element_size(), shared=True)
                                ["gather"], 0]


def test_one_decode_step_reads_a_tenth_of_dense_at_one_sixteenth():
    """SmolLM2's shapes at 1/16 (METHODS.md): 2048 cached tokens, 16 of 64 channels at 4 bits on a per-channel
    grid, 128 tokens shared per kv head; the kernels' own counters equal the analytic count, <= 1/10 of dense."""
    from sparsify.attention.accounting import kv_bytes
    from sparsify.attention.double_sparsity import DoubleSparsityConfig

    b, h, kvh, t, d, r, k = 1, 9, 3, 2048, 64, 16, 128
    q, kc, vc, ch = _cache(b, h, kvh, t, d, r, seed=16, dtype=torch.float16)
    q_label, labels = _labels(q, kc, ch)
    codes, scale, zero = R.ds_quantize_labels_ref(labels, 4, torch.stack([labels.amin((0, 2)), labels.amax((0, 2))]))
    counter = torch.zeros(2, dtype=torch.int64)
    scores = label_scores(q_label, codes, label_scale=scale, label_zero=zero, bits=4, counter=counter)  # (B, H, T)
    idx = scores.view(b, kvh, h // kvh, t).amax(2).topk(k, dim=-1).indices  # (B, KVH, k): one selection per kv head
    gather_attention(q, kc, vc, idx, counter=counter)
    layer = kv_bytes({"blocks": 30, "heads": h, "kv_heads": kvh, "head_dim": d},
                     DoubleSparsityConfig(tokens=k, channels=r, label_bits=4), t)["per_sparse_layer"]
    assert counter.tolist() == [layer["labels"] + layer["gather"], layer["label_meta"]]
    assert int(counter.sum()) == layer["sparse"] and layer["sparse"] <= layer["dense"] / 10


def test_gather_padding_views_and_counts():
    b, h, kvh, t, d, k = 2, 6, 2, 37, 48, 20
    q, kc, vc, _ = _cache(b, h, kvh, 50, d, 1, seed=5)
    kc, vc = kc[:, :, :t], vc[:, :, :t]  # a preallocated cache's first T tokens: strided views, not copied
    idx = torch.rand(b, h, t, generator=torch.Generator().manual_seed(1)).argsort(-1)[..., :k].int()
    idx[0, 0, :4] = -1  # padding at the front: the first chunk selects nothing
    idx[1, 3, 5] = t + 3  # out of range: padding too
    valid = torch.tensor([[20, 17, 0, 1, 16, 99], [3, 20, 20, 20, 20, 7]])
    counter = torch.zeros(2, dtype=torch.int64)
    got = gather_attention(q, kc, vc, idx, valid, scale=0.2, counter=counter)
    torch.testing.assert_close(got, R.ds_gather_attention_ref(q, kc, vc, idx, valid, 0.2), **TOL[torch.float32])
    ok = (idx >= 0) & (idx < t) & (torch.arange(k) < valid[..., None])
    torch.testing.assert_close(got, _dense_masked(q, kc, vc, idx, ok, 0.2), **TOL[torch.float32])
    assert bool((got[0, 2] == 0).all())  # valid = 0: nothing selected, zeros
    assert counter.tolist() == [int(ok.sum()) * d * 2 * 4, 0]  # only the selected rows are loaded
    counter.zero_()
    full = torch.rand(b, h, t, generator=torch.Generator().manual_seed(2)).argsort(-1)[..., :k]
    gather_attention(q.half(), kc.half(), vc.half(), full, counter=counter)
    assert counter.tolist() == [kv_bytes_read(b, h, kvh, t, d, 12, k)["gather"], 0]


def test_bytes_accounting_matches_methods_example():
    """METHODS.md's 1/16: 128 of 2048 tokens, 32 of 128 channels at 4 bits against fp16 K (Llama-2-7B head shape)."""
    a = kv_bytes_read(1, 32, 32, 2048, 128, 32, 128, kv_itemsize=2, label_bits=4)
    assert a["labels"] * 16 == a["dense"] // 2  # label channels * bits / (d * 16) = 1/16 of K
    assert a["gather"] * 16 == a["dense"]  # k / T = 1/16 of K and V
    assert a["sparse"] == a["labels"] + a["gather"] and a["label_meta"] == 0
    gqa = kv_bytes_read(1, 9, 3, 100, 64, 16, 10)  # GQA: the gather pass counts every query head's rows
    assert gqa["gather"] == 9 * 10 * 64 * 2 * 2 and gqa["labels"] == 3 * 100 * 16 * 2


def test_label_counter_float_and_bad_input():
    q_label, labels = torch.randn(1, 4, 8).half(), torch.randn(1, 2, 90, 8).half()[:, :, :70]  # a cache's view
    counter = torch.zeros(2, dtype=torch.int64)
    torch.testing.assert_close(label_scores(q_label, labels, counter=counter), R.ds_label_scores_ref(q_label, labels),
                               **SCORE_TOL)
    assert counter.tolist() == [kv_bytes_read(1, 4, 2, 70, 32, 8, 0)["labels"], 0]
    codes = torch.zeros(1, 2, 70, 8, dtype=torch.uint8)
    bad = [(lambda: label_scores(q_label, torch.randn(1, 3, 70, 8)), "KVH dividing H=4"),
           (lambda: label_scores(q_label, codes), "label_scale"),
           (lambda: label_scores(q_label, codes, label_scale=torch.ones(1, 2, 70), bits=4), "must be 4 for R=8"),
           (lambda: label_scores(q_label, labels, bits=4), "float labels"),
           (lambda: label_scores(q_label, labels, counter=torch.zeros(2)), "int64"),
           (lambda: gather_attention(torch.randn(1, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 7),
                                     torch.zeros(1, 4, 2, dtype=torch.long)), "K and V"),
           (lambda: gather_attention(torch.randn(1, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8),
                                     torch.zeros(1, 4, 2)), "idx must be int32/int64")]
    for call, match in bad:
        with pytest.raises(UserError, match=match):
            call()
