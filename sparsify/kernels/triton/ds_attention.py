"""Triton kernels for Double Sparsity decode attention: one new query per sequence (METHODS.md).

A decode step runs two memory-bound passes over the cache, q (B, H, D), K / V (B, KVH, T, D):

1. `label_scores`: approximate scores (q_r . L_t) * scale of every cached token t, where the label
   cache L (B, KVH, T, R) holds K restricted to R calibrated channels of each kv head. One program
   owns BLOCK_T tokens of one kv head and all G = H // KVH query heads that read it (grouped-query
   attention), so each label byte is read once per step, not G times: B*KVH*T*R values.
2. `gather_attention`: exact softmax attention of the full q over the k tokens the caller picked
   (the top-k of the scores). One program per selection streams its indices in chunks of BLOCK_K
   with an online softmax per query head (running max m, normaliser l, fp32 accumulator), so k is
   unbounded and nothing of size T is built. A selection shared by the G query heads of a kv head
   (idx (B, KVH, k)) is one program for all G: each row is loaded once, B*KVH*k*D elements of K and
   as many of V; one selection per query head (idx (B, H, k)) loads B*H*k*D.

Quantized labels: uint8 codes, value = (code - zero) * scale. Per token: float scale / zero
(B, KVH, T) read beside the codes (zero defaults to 2**(bits-1)). Per channel (KVH, R), calibrated
offline: the wrapper folds them into the query, q_c * scale_c and a constant -sum_c q_c scale_c zero_c
per query head, so the kernel reads codes only (PER_TOKEN False) and the cache holds no per-token
metadata. bits=8: one code per byte, labels (B, KVH, T, R). bits=4: two codes per byte along R, labels
(B, KVH, T, ceil(R/2)), channel 2j in byte j's low nibble and 2j+1 in its high nibble (unused for
odd R); each byte is loaded once and split into even and odd channels, met by q's even and odd ones.

Padding (`gather_attention`): an idx entry selects nothing and loads nothing if it is < 0, >= T, or
at a position >= valid[b, h]. The caller gives unique indices (a duplicate counts twice, as in the
reference). A head that selects nothing outputs zeros.

Arithmetic (the tests' tolerances): loads convert to fp32; products, sums, exp are fp32; no tl.dot
(decode is memory-bound; bf16 tl.dot is wrong in the interpreter). Codes are scaled after the
channel sum, sum(q * (code - zero)) * scale: only the rounding order differs from the reference, as
does the online softmax's one rescale per chunk (a few fp32 ulps). Attention rounds once to q's dtype.

`counter` (optional int64 (2,) tensor): each program adds the bytes its masked loads read, [0] the
KV cache (labels, or K and V), [1] label scales and zeros (per channel: the wrapper adds the table's
bytes once per call), so tests hold the kernels to `kv_bytes_read`. COUNT is a constexpr: no cost when off.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparsify.errors import UserError
from sparsify.kernels.triton.nm_matmul import FLOATS, INTERPRET

BLOCK_T = 64  # tokens per label-scores program (fewer when G x BLOCK_T x BLOCK_C > 8192 registers), untuned
BLOCK_K = 16 if INTERPRET else 64  # selected tokens per online-softmax step (small in the interpreter: many steps)


@triton.jit
def _label_scores_kernel(
    # tensors: q_label (B, H, R), labels (B, KVH, T, R or ceil(R/2)), scale / zero (B, KVH, T), out (B, H, T) fp32,
    # counter (2,) int64
    q_ptr, lab_ptr, scale_ptr, zero_ptr, out_ptr, count_ptr,
    # sizes: T tokens, R label channels, G query heads per kv head; sm_scale multiplies every score
    T, R, G, sm_scale,
    # strides in elements (every last dim is contiguous)
    s_qb, s_qh, s_lb, s_lh, s_lt, s_sb, s_sh, s_zb, s_zh, s_ob, s_oh,
    # label format: BITS 16 = float labels, 8 / 4 = uint8 codes; PER_TOKEN: scale (and zero if HAS_ZERO, else
    # 2**(BITS-1)) per token, else raw codes (the wrapper folded a per-channel grid into q); byte sizes for COUNT
    BITS: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_ZERO: tl.constexpr, LBYTES: tl.constexpr, SBYTES: tl.constexpr,
    COUNT: tl.constexpr,
    # tiles: BLOCK_T tokens, BLOCK_C stored label columns, BLOCK_G >= G query heads
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
):
    b, g = tl.program_id(2).to(tl.int64), tl.program_id(1).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c, offs_g = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_G)
    t_ok, g_ok = offs_t < T, offs_g < G
    l_ok = t_ok[:, None] & (offs_c < ((R + 1) // 2 if BITS == 4 else R))[None, :]  # (BLOCK_T, BLOCK_C)
    lab = tl.load(lab_ptr + b * s_lb + g * s_lh + offs_t[:, None].to(tl.int64) * s_lt + offs_c[None, :],
                  mask=l_ok, other=0)  # (BLOCK_T, BLOCK_C) as stored
    q_rows = q_ptr + b * s_qb + (g * G + offs_g)[:, None] * s_qh  # (BLOCK_G, 1)
    if BITS == 16:
        q = tl.load(q_rows + offs_c[None, :], mask=g_ok[:, None] & (offs_c < R)[None, :], other=0).to(tl.float32)
        s = tl.sum(q[:, None, :] * lab.to(tl.float32)[None, :, :], axis=2)  # (BLOCK_G, BLOCK_T)
    else:
        if not PER_TOKEN:
            zero = 0.0
        elif HAS_ZERO:
            zero = tl.load(zero_ptr + b * s_zb + g * s_zh + offs_t, mask=t_ok, other=0).to(tl.float32)[:, None]
        else:
            zero = 2.0 ** (BITS - 1)
        if BITS == 4:  # byte j holds channels 2j (low nibble) and 2j+1 (high nibble)
            code = lab.to(tl.int32)
            even = tl.load(q_rows + 2 * offs_c[None, :], mask=g_ok[:, None] & (2 * offs_c < R)[None, :], other=0)
            odd = tl.load(q_rows + 2 * offs_c[None, :] + 1, mask=g_ok[:, None] & (2 * offs_c + 1 < R)[None, :],
                          other=0)
            s = tl.sum(even.to(tl.float32)[:, None, :] * ((code & 15).to(tl.float32) - zero)[None, :, :], axis=2)
            s += tl.sum(odd.to(tl.float32)[:, None, :] * ((code >> 4).to(tl.float32) - zero)[None, :, :], axis=2)
        else:
            q = tl.load(q_rows + offs_c[None, :], mask=g_ok[:, None] & (offs_c < R)[None, :], other=0).to(tl.float32)
            s = tl.sum(q[:, None, :] * (lab.to(tl.float32) - zero)[None, :, :], axis=2)
        if PER_TOKEN:
            scale = tl.load(scale_ptr + b * s_sb + g * s_sh + offs_t, mask=t_ok, other=0).to(tl.float32)  # (BLOCK_T,)
            s = s * scale[None, :]
    out = out_ptr + b * s_ob + (g * G + offs_g)[:, None] * s_oh + offs_t[None, :]
    tl.store(out, s * sm_scale, mask=g_ok[:, None] & t_ok[None, :])
    if COUNT:
        tl.atomic_add(count_ptr, tl.sum(l_ok.to(tl.int64)) * LBYTES)
        tl.atomic_add(count_ptr + 1, tl.sum(t_ok.to(tl.int64)) * SBYTES)


@triton.jit
def _gather_attention_kernel(
    # tensors: q (B, H, D), K / V (B, KVH, T, D), idx (B, ROWS, k) int32/int64, valid (B, ROWS) int32,
    # out (B, H, D), counter (2,) int64
    q_ptr, k_ptr, v_ptr, idx_ptr, valid_ptr, out_ptr, count_ptr,
    # sizes: T cached tokens, D head dim, NSEL = k index slots per row, G query heads per kv head,
    # HPR query heads per idx row (1: one selection per query head; G: one per kv head); sm_scale
    T, D, NSEL, G, HPR, sm_scale,
    # strides in elements (every last dim is contiguous)
    s_qb, s_qh, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ib, s_ih, s_nb, s_ob, s_oh,
    # options: HAS_VALID, K / V element bytes for COUNT
    HAS_VALID: tl.constexpr, KVBYTES: tl.constexpr, COUNT: tl.constexpr,
    # tiles: BLOCK_K selected tokens per step, BLOCK_D >= D, BLOCK_G >= HPR query heads
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
):
    row, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    kvh = (row * HPR) // G
    offs_d, offs_g = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_G)
    d_ok, g_ok = offs_d < D, offs_g < HPR
    heads = row * HPR + offs_g  # (BLOCK_G,) the query heads this program serves
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                other=0).to(tl.float32)  # (BLOCK_G, BLOCK_D)
    n = NSEL
    if HAS_VALID:
        n = tl.minimum(tl.load(valid_ptr + b * s_nb + row), NSEL)
    k_rows, v_rows = k_ptr + b * s_kb + kvh * s_kh, v_ptr + b * s_vb + kvh * s_vh
    m = tl.full((BLOCK_G,), -1e30, tl.float32)  # running max starts finite: exp(m - m_new) of padding is 1, not nan
    l_sum = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for start in range(0, n, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        tok = tl.load(idx_ptr + b * s_ib + row * s_ih + offs_k, mask=offs_k < n, other=-1).to(tl.int64)  # (BLOCK_K,)
        ok = (offs_k < n) & (tok >= 0) & (tok < T)
        kv_ok = ok[:, None] & d_ok[None, :]  # (BLOCK_K, BLOCK_D)
        kt = tl.load(k_rows + tok[:, None] * s_kt + offs_d[None, :], mask=kv_ok, other=0).to(tl.float32)
        s = tl.sum(q[:, None, :] * kt[None, :, :], axis=2) * sm_scale  # (BLOCK_G, BLOCK_K)
        s = tl.where(ok[None, :], s, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha, p = tl.exp(m - m_new), tl.exp(s - m_new[:, None])  # (BLOCK_G,), (BLOCK_G, BLOCK_K)
        vt = tl.load(v_rows + tok[:, None] * s_vt + offs_d[None, :], mask=kv_ok, other=0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt[None, :, :], axis=1)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        m = m_new
        if COUNT:  # each selected row is loaded once per program, whatever the heads it serves
            tl.atomic_add(count_ptr, tl.sum(kv_ok.to(tl.int64)) * (2 * KVBYTES))
    out = acc / tl.maximum(l_sum, 1.0)[:, None]  # l_sum >= 1 (the max's own term is exp(0)) unless nothing selected
    tl.store(out_ptr + b * s_ob + heads[:, None] * s_oh + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=g_ok[:, None] & d_ok[None, :])


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with a contiguous last dim (a slice of a preallocated cache stays a view)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _check_counter(counter, device) -> None:
    if counter is not None and (counter.dtype != torch.int64 or counter.shape != (2,) or counter.device != device):
        raise UserError(f"counter must be an int64 tensor of shape (2,) on {device}")


def _check_heads(name: str, heads: int, q_b: int, cache: torch.Tensor) -> int:
    """Checks the GQA head layout; returns G = heads per kv head."""
    if cache.dim() != 4 or cache.shape[0] != q_b or cache.shape[1] == 0 or heads % cache.shape[1]:
        raise UserError(f"{name} must be (B={q_b}, KVH, T, ...) with KVH dividing H={heads}; got {list(cache.shape)}")
    return heads // cache.shape[1]


def label_scores(q_label: torch.Tensor, labels: torch.Tensor, scale: float | None = None, *,
                 label_scale: torch.Tensor | None = None, label_zero: torch.Tensor | None = None,
                 bits: int | None = None, counter: torch.Tensor | None = None) -> torch.Tensor:
    """Approximate scores (q_label . dequant(labels)) * scale (default 1/sqrt(R)) -> (B, H, T) fp32.

    q_label (B, H, R) float; labels (B, KVH, T, R) float, or uint8 codes with ``label_scale`` (and optionally
    ``label_zero``) per token (B, KVH, T) or per channel (KVH, R) float: ``bits`` 8 (default), or 4 with labels
    (B, KVH, T, ceil(R/2)) packed.
    """
    if q_label.dim() != 3 or q_label.dtype not in FLOATS or q_label.shape[2] == 0:
        raise UserError(f"q_label must be a float (B, H, R > 0) tensor; got {q_label.dtype} {list(q_label.shape)}")
    B, H, R = q_label.shape
    G = _check_heads("labels", H, B, labels)
    KVH, T = labels.shape[1:3]
    quant = labels.dtype == torch.uint8
    nbits = (bits or 8) if quant else 16
    if quant and (nbits not in (4, 8) or label_scale is None):
        raise UserError(f"uint8 labels need bits 4 or 8 and a label_scale; got bits={bits}")
    if not quant and (labels.dtype not in FLOATS or bits is not None or label_scale is not None):
        raise UserError(f"float labels take no bits / label_scale; quantized labels are uint8; got {labels.dtype}")
    width = -(-R // 2) if nbits == 4 else R
    if labels.shape[3] != width:
        raise UserError(f"labels last dim must be {width} for R={R} at {nbits} bits; got {labels.shape[3]}")
    per_channel = quant and label_scale.dim() == 2
    grid = (KVH, R) if per_channel else (B, KVH, T)
    for t in (label_scale, label_zero):
        if t is not None and (t.shape != grid or t.dtype not in FLOATS):
            raise UserError(f"label_scale / label_zero must be float {grid} (per token (B, KVH, T) or per channel "
                            f"(KVH, R)); got {t.dtype} {list(t.shape)}")
    if any(t is not None and t.device != q_label.device for t in (labels, label_scale, label_zero)):
        raise UserError(f"q_label is on {q_label.device} but the label cache is not: move them together")
    _check_counter(counter, q_label.device)
    sm_scale = 1 / math.sqrt(R) if scale is None else float(scale)
    bias = None
    if per_channel:  # fold the grid into q: sum_c q_c (code_c - zero_c) scale_c = (q * scale) . code - (q * scale) . zero
        q_label = q_label.float() * label_scale.float().repeat_interleave(G, 0)[None]  # (B, H, R)
        zero = label_zero.float() if label_zero is not None else torch.full_like(label_scale.float(), 2 ** (nbits - 1))
        bias = -(q_label * zero.repeat_interleave(G, 0)[None]).sum(-1, keepdim=True)  # (B, H, 1)
        if counter is not None:  # the per-channel table, read once per call
            counter[1] += label_scale.numel() * label_scale.element_size() + (
                0 if label_zero is None else label_zero.numel() * label_zero.element_size())
    q, lab = _rows(q_label), _rows(labels)
    per_token = quant and not per_channel
    sc, zp = _rows(label_scale) if per_token else lab, _rows(label_zero) if per_token and label_zero is not None else lab
    out = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    if B and H and T:
        meta_bytes = (sc.element_size() + (zp.element_size() if label_zero is not None else 0)) if per_token else 0
        block_c, block_g = triton.next_power_of_2(width), triton.next_power_of_2(G)
        block_t = min(BLOCK_T, max(16, 8192 // (block_g * block_c)))
        _label_scores_kernel[(triton.cdiv(T, block_t), KVH, B)](
            q, lab, sc, zp, out, counter if counter is not None else out,
            T, R, G, sm_scale,
            q.stride(0), q.stride(1), lab.stride(0), lab.stride(1), lab.stride(2), sc.stride(0), sc.stride(1),
            zp.stride(0), zp.stride(1), out.stride(0), out.stride(1),
            BITS=nbits, PER_TOKEN=per_token, HAS_ZERO=per_token and label_zero is not None,
            LBYTES=lab.element_size(), SBYTES=meta_bytes,
            COUNT=counter is not None, BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_G=block_g)
    return out if bias is None else out + bias * sm_scale


def gather_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, idx: torch.Tensor,
                     valid: torch.Tensor | None = None, scale: float | None = None, *,
                     counter: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q . K[idx]^T * scale) V[idx] per query head (default scale 1/sqrt(D)) -> (B, H, D) in q's dtype.

    q (B, H, D) float; K, V (B, KVH, T, D) float; idx (B, H, k) int32/int64 token indices, one selection per
    query head, or (B, KVH, k), one per kv head shared by its query heads (each row is then loaded once for
    all of them); valid (B, rows of idx) int: only the first valid[b, row] entries count. Entries < 0 or
    >= T are padding.
    """
    if q.dim() != 3 or q.dtype not in FLOATS:
        raise UserError(f"q must be a float (B, H, D) tensor; got {q.dtype} {list(q.shape)}")
    B, H, D = q.shape
    G = _check_heads("K", H, B, K)
    if K.shape[3] != D or V.shape != K.shape or K.dtype not in FLOATS or V.dtype != K.dtype:
        raise UserError(f"K and V must be float (B, KVH, T, {D}) of one dtype; got {K.dtype} {list(K.shape)}, "
                        f"{V.dtype} {list(V.shape)}")
    rows = idx.shape[1] if idx.dim() == 3 else -1
    if idx.dim() != 3 or idx.shape[0] != B or rows not in (H, K.shape[1]) or idx.dtype not in (torch.int32, torch.int64):
        raise UserError(f"idx must be int32/int64 ({B}, {H} or {K.shape[1]}, k); got {idx.dtype} {list(idx.shape)}")
    if valid is not None and (valid.shape != (B, rows) or valid.dtype not in (torch.int32, torch.int64)):
        raise UserError(f"valid must be int32/int64 ({B}, {rows}); got {valid.dtype} {list(valid.shape)}")
    if any(t is not None and t.device != q.device for t in (K, V, idx, valid)):
        raise UserError(f"q is on {q.device} but the cache / indices are not: move them together")
    _check_counter(counter, q.device)
    hpr = 1 if rows == H else G  # query heads per idx row
    qq, kk, vv, ii = _rows(q), _rows(K), _rows(V), _rows(idx)
    nv = valid.to(torch.int32).contiguous() if valid is not None else ii
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if B and H and D:
        _gather_attention_kernel[(rows, B)](
            qq, kk, vv, ii, nv, out, counter if counter is not None else out,
            K.shape[2], D, idx.shape[2], G, hpr, 1 / math.sqrt(D) if scale is None else float(scale),
            qq.stride(0), qq.stride(1), kk.stride(0), kk.stride(1), kk.stride(2), vv.stride(0), vv.stride(1),
            vv.stride(2), ii.stride(0), ii.stride(1), nv.stride(0), out.stride(0), out.stride(1),
            HAS_VALID=valid is not None, KVBYTES=K.element_size(), COUNT=counter is not None,
            BLOCK_K=BLOCK_K, BLOCK_D=triton.next_power_of_2(D), BLOCK_G=triton.next_power_of_2(hpr))
    return out


def kv_bytes_read(batch: int, heads: int, kv_heads: int, tokens: int, head_dim: int, label_channels: int,
                  k: int, *, kv_itemsize: int = 2, label_bits: int = 16, label_meta_bytes: int = 0,
                  channel_meta_bytes: int = 0, shared: bool = False) -> dict[str, int]:
    """Bytes of KV cache one decode step reads (pure Python): the label pass, the gather pass, their sum
    ("sparse") and a dense attention's K and V ("dense"). k = selected tokens per selection (all valid), one
    selection per query head, or per kv head when ``shared`` (idx (B, KVH, k));
    label_meta_bytes = scale + zero bytes per token (e.g. 8 for fp32 both, 4 for fp16 both);
    channel_meta_bytes = scale + zero bytes per channel of a per-channel grid (read once per step)."""
    per_token = -(-label_channels * label_bits // 8)  # 4 bits: ceil(R/2) packed bytes
    labels = batch * kv_heads * tokens * per_token
    meta = batch * kv_heads * tokens * label_meta_bytes + kv_heads * label_channels * channel_meta_bytes
    gather = batch * (kv_heads if shared else heads) * k * head_dim * 2 * kv_itemsize  # rows loaded per selection
    return {"labels": labels, "label_meta": meta, "gather": gather, "sparse": labels + meta + gather,
            "dense": batch * kv_heads * tokens * head_dim * 2 * kv_itemsize}
