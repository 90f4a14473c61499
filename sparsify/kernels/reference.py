"""Pure-torch ground truth for every sparse op: unpack the weight, then a dense matmul in fp32.

Always available (CPU, any device) and the oracle of the Triton kernels' tests. The N:M layout is
re-derived here from its specification with plain indexing, independently of `sparsify.formats.nm`,
so the two implementations check each other:

    values (out, G*N): each group's N kept values, ascending columns (int4: two codes per byte,
    low nibble = even j); meta (out, ceil(G*N*b/8)) uint8: index j's in-group position at byte
    (j*b)//8, bit (j*b)%8; b = 2 if M <= 4, 4 if M <= 16, else 8.
    dequant = (code - zero) * scale[row, ((j // N) * M) // group_size] in fp32.

Every function here has the signature of its Triton twin (`nm_linear_ref` <-> `nm_linear`, ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}


def index_bits(m: int) -> int:
    """Bits per in-group index in ``meta``."""
    return 2 if m <= 4 else 4 if m <= 16 else 8


def nm_unpack_ref(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, shape, bits: int | None = None,
                  ) -> torch.Tensor:
    """Float N:M values + meta -> dense (out, in) in ``values``' dtype."""
    out, inp = shape
    bits = bits or index_bits(m)
    j = torch.arange(inp // m * n, device=meta.device)  # packed index of each kept value
    byte = meta[:, (j * bits) // 8].long()  # (out, k)
    idx = (byte >> ((j * bits) % 8)) & ((1 << bits) - 1)  # (out, k) in-group positions
    cols = (j // n) * m + idx  # (out, k) dense columns
    dense = torch.zeros(out, inp, dtype=values.dtype, device=values.device)
    dense[torch.arange(out, device=meta.device)[:, None], cols] = values
    return dense


def random_nm_weight(out: int, inp: int, n: int, m: int, seed: int = 0, dtype=torch.float32, full: bool = True,
                     ) -> torch.Tensor:
    """Random dense (out, in) N:M weight; ``full=False`` also empties ~10% of the kept slots."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    keep = (torch.rand(out, inp // m, m, generator=g).argsort(-1) < n).reshape(out, inp)
    if not full:
        keep &= torch.rand(out, inp, generator=g) < 0.9
    return torch.where(keep, w, 0.0).to(dtype)


def nm_pack_ref(weight: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (out, in) with at most n non-zeros per group of m -> (values (out, G*n), meta uint8).

    Each group keeps its non-zeros, topped up with its lowest zero positions, ascending."""
    out, inp = weight.shape
    bits = index_bits(m)
    groups = weight.reshape(out, inp // m, m)  # (out, G, m)
    pos = torch.arange(m, device=weight.device)
    score = (groups != 0).int() * (2 * m) + (m - 1 - pos)  # non-zeros first, then lowest positions
    idx = score.topk(n, dim=-1).indices.sort(-1).values  # (out, G, n)
    values = groups.gather(-1, idx).reshape(out, -1)  # (out, G*n)
    k = idx.shape[1] * n
    shifted = idx.reshape(out, k).long() << ((torch.arange(k, device=weight.device) * bits) % 8)  # (out, k)
    nbytes = -(-k * bits // 8)
    byte_of = (torch.arange(k, device=weight.device) * bits) // 8  # (k,)
    meta = torch.zeros(out, nbytes, dtype=torch.long, device=weight.device).index_add_(1, byte_of, shifted)
    return values.contiguous(), meta.to(torch.uint8)


def int4_pack_ref(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (out, k) in [0, 15] -> (out, ceil(k/2)) bytes, even j in the low nibble."""
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def int4_unpack_ref(packed: torch.Tensor, k: int) -> torch.Tensor:
    """(out, ceil(k/2)) bytes -> uint8 codes (out, k)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)[:, :k]


def value_groups(k: int, n: int, m: int, group_size: int, device=None) -> torch.Tensor:
    """Quant group of each packed value j: ((j // N) * M) // group_size, shape (k,)."""
    return ((torch.arange(k, device=device) // n) * m) // group_size


def dequant_values_ref(values, scale, zero, n, m, quant, group_size, k) -> torch.Tensor:
    """Packed codes -> float32 values (out, k): ((code - zero) * scale) in fp32."""
    codes = int4_unpack_ref(values, k) if quant == "int4" else values
    grp = value_groups(k, n, m, group_size, values.device)  # (k,)
    z = zero[:, grp].float() if zero is not None else 8.0 if quant == "int4" else 0.0
    return (codes.float() - z) * scale[:, grp]  # (out, k)


def quant_pack_ref(weight, n, m, quant, group_size=None, symmetric=True):
    """Dense N:M weight -> (codes, meta, scale (out, ngroups), zero or None) with round-to-nearest
    scales per group of ``group_size`` dense columns (None: per output channel). For benchmarks/tests."""
    out, inp = weight.shape
    gs = group_size or inp
    values, meta = nm_pack_ref(weight, n, m)  # (out, k)
    grp = value_groups(values.shape[1], n, m, gs, weight.device)
    wg = F.pad(weight.float(), (0, -inp % gs)).reshape(out, -1, gs)  # (out, ngroups, gs), last group padded
    zero = None
    if quant == "int4" and not symmetric:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))
        zero = torch.round(-lo / scale).clamp(0, 15).to(torch.uint8)
    else:
        amax = wg.abs().amax(-1)
        scale = torch.where(amax > 0, amax / QMAX[quant], torch.ones_like(amax))
    q = values.float() / scale[:, grp]  # (out, k)
    if quant == "fp8":
        codes = q.clamp(-448, 448).to(torch.float8_e4m3fn)
    elif quant == "int8":
        codes = torch.round(q).clamp(-127, 127).to(torch.int8)
    else:
        z = zero[:, grp].float() if zero is not None else 8.0
        codes = int4_pack_ref((torch.round(q) + z).clamp(0, 15).to(torch.uint8))
    return codes, meta, scale.contiguous(), zero


def nm_linear_ref(x, values, meta, n, m, bias=None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for float N:M values; fp32 math, output in x's dtype."""
    out, inp = values.shape[0], x.shape[-1]
    w = nm_unpack_ref(values.float(), meta, n, m, (out, inp))  # (out, in)
    y = x.float() @ w.T  # (..., out)
    return (y if bias is None else y + bias.float()).to(x.dtype)


def nm_linear_wq_ref(x, values, meta, scale, zero, n, m, quant, group_size, bias=None) -> torch.Tensor:
    """Weight-only int8 / int4 / fp8 codes: dequantize in fp32, then `nm_linear_ref`."""
    k = x.shape[-1] // m * n  # packed values per row
    return nm_linear_ref(x, dequant_values_ref(values, scale, zero, n, m, quant, group_size, k), meta, n, m, bias)


def quantize_act_ref(x: torch.Tensor, act_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, K) -> (int8 codes (T, K), fp32 scales (T,)): per token max(amax / 127, 1e-8), or static."""
    xf = x.float()
    if act_scale is None:
        scale = (xf.abs().amax(-1) / 127).clamp(min=1e-8)  # (T,)
    else:
        scale = torch.as_tensor(act_scale, dtype=torch.float32, device=x.device).reshape(1).expand(x.shape[0])
    return torch.round(xf / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.contiguous()


def quantize_activations_ref(x: torch.Tensor, act_scale=None) -> torch.Tensor:
    """W8A8's activation rounding, simulated: quantize, dequantize, back in x's dtype."""
    q, s = quantize_act_ref(x.reshape(-1, x.shape[-1]), act_scale)
    return (q.float() * s[:, None]).to(x.dtype).reshape(x.shape)


def w8a8_linear_ref(x, values, meta, w_scale, n, m, act_scale=None, bias=None) -> torch.Tensor:
    """Exact integer matmul of int8 activations and int8 N:M weights (float64), then the epilogue."""
    out, inp = values.shape[0], x.shape[-1]
    qx, sx = quantize_act_ref(x.reshape(-1, inp), act_scale)  # (T, in), (T,)
    qw = nm_unpack_ref(values, meta, n, m, (out, inp))  # (out, in) int8
    y = (qx.double() @ qw.double().T).float() * sx[:, None] * w_scale.reshape(1, -1).float()  # (T, out)
    y = y if bias is None else y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], out)


def bsr_linear_ref(x: torch.Tensor, values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor, shape,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a ``bsr`` W, tile by tile: a slow loop straight from the layout, in fp32
    (the Triton BSR kernel's oracle; it never builds the dense weight)."""
    out, inp = shape
    _, r, c = values.shape
    xp = F.pad(x.reshape(-1, inp).float(), (0, -inp % c))  # (T, Bc*C), zero columns under edge-tile padding
    y = torch.zeros(xp.shape[0], -(-out // r) * r, device=x.device)  # (T, Br*R)
    for br in range(row_ptr.numel() - 1):
        for j in range(int(row_ptr[br]), int(row_ptr[br + 1])):
            col = int(col_idx[j])
            y[:, br * r:(br + 1) * r] += xp[:, col * c:(col + 1) * c] @ values[j].float().T  # (T, R)
    y = y[:, :out] + (0 if bias is None else bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], out)


def linear(x: torch.Tensor, fmt: str, tensors: dict[str, torch.Tensor], attrs: dict,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + b with W = unpack(fmt, tensors, attrs); w8a8 also rounds the activations."""
    from sparsify import formats

    weight = formats.unpack(fmt, tensors, attrs).to(x.dtype)  # (out, in)
    if attrs.get("activations") == "int8":
        x = quantize_activations_ref(x, act_scale(tensors, attrs))
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def act_scale(tensors: dict, attrs: dict):
    """The static activation scale of a w8a8 weight, if calibrated (tensor or attribute), else None."""
    scale = tensors.get("input_scale", attrs.get("input_scale"))
    return None if scale is None else torch.as_tensor(scale, dtype=torch.float32)


def ds_dequant_labels_ref(labels: torch.Tensor, r: int, label_scale=None, label_zero=None, bits=None) -> torch.Tensor:
    """Double Sparsity label cache -> fp32 (B, KVH, T, r): float labels as they are; uint8 codes
    (code - zero) * scale, with scale / zero per token (B, KVH, T) or per channel (KVH, r), zero
    default 2**(bits-1); bits=4: channel 2j in byte j's low nibble."""
    if labels.dtype != torch.uint8:
        return labels.float()
    bits = bits or 8
    codes = labels.long()
    if bits == 4:
        codes = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)[..., :r]  # (B, KVH, T, r)
    per_channel = label_scale.dim() == 2

    def grid(t):  # (B, KVH, T) -> (B, KVH, T, 1); (KVH, r) -> (1, KVH, 1, r)
        return t.float()[None, :, None, :] if per_channel else t.float()[..., None]

    zero = grid(label_zero) if label_zero is not None else float(2 ** (bits - 1))
    return (codes.float() - zero) * grid(label_scale)


def ds_label_grid(x: torch.Tensor, bits: int, lo=None, hi=None):
    """Round-to-nearest codes of x (..., r) on a uniform grid -> (codes, scale, zero), all fp32, scale / zero
    broadcastable to x, value = (code - zero) * scale.

    Per token (lo / hi None): over the row's [min(x, 0), max(x, 0)] with an integer zero point. Per
    channel (calibrated lo / hi): over exactly [lo, hi] (a key channel is often one-sided: forcing 0
    into its range would waste codes), zero = -lo / scale a float; values beyond the range clip.
    """
    x = x.float()
    qmax = 2 ** bits - 1
    if lo is None:
        lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
        scale = torch.where(hi > lo, (hi - lo) / qmax, torch.ones_like(hi))
        zero = torch.round(-lo / scale).clamp(0, qmax)  # an integer code
    else:
        lo, hi = lo.float(), torch.maximum(hi.float(), lo.float())
        scale = torch.where(hi > lo, (hi - lo) / qmax, torch.ones_like(hi))
        zero = -lo / scale
    codes = (torch.round(x / scale + zero)).clamp(0, qmax)  # values beyond [lo, hi] clip
    return codes, scale, zero


def ds_quantize_labels_ref(labels: torch.Tensor, bits: int = 4, label_range: torch.Tensor | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float labels (B, KVH, T, r) -> (uint8 codes, fp32 scale, fp32 zero): per token (B, KVH, T) over each
    token's [min, max], or with ``label_range`` (2, KVH, r) = [min; max] per channel, scale / zero (KVH, r);
    bits=4 packs two codes a byte, even channel low."""
    if label_range is None:
        codes, scale, zero = ds_label_grid(labels, bits)
        scale, zero = scale[..., 0], zero[..., 0]  # (B, KVH, T)
    else:
        codes, scale, zero = ds_label_grid(labels, bits, label_range[0][None, :, None], label_range[1][None, :, None])
        scale, zero = scale[0, :, 0], zero[0, :, 0]  # (KVH, r)
    codes = codes.to(torch.uint8)
    if bits == 4:
        codes = F.pad(codes, (0, codes.shape[-1] % 2))
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes.contiguous(), scale.contiguous(), zero.contiguous()


def ds_label_scores_ref(q_label, labels, scale=None, *, label_scale=None, label_zero=None, bits=None) -> torch.Tensor:
    """(q_label (B, H, r) . dequant(labels) (B, KVH, T, r)) * scale (default 1/sqrt(r)) -> (B, H, T) fp32;
    query head h reads kv head h // (H // KVH)."""
    r = q_label.shape[-1]
    lab = ds_dequant_labels_ref(labels, r, label_scale, label_zero, bits)  # (B, KVH, T, r)
    lab = lab.repeat_interleave(q_label.shape[1] // lab.shape[1], dim=1)  # (B, H, T, r)
    return torch.einsum("bhr,bhtr->bht", q_label.float(), lab) * (r ** -0.5 if scale is None else scale)


def ds_gather_attention_ref(q, K, V, idx, valid=None, scale=None) -> torch.Tensor:
    """Exact attention of q (B, H, D) over the selected tokens K[idx], V[idx] (B, KVH, T, D) in fp32, in q's
    dtype; entries < 0, >= T or at positions >= valid[b, h] are padding; a head with none outputs zeros."""
    B, H, D = q.shape
    T = K.shape[2]
    heads = torch.arange(H, device=q.device) // (H // K.shape[1])  # kv head of each query head
    pos = torch.arange(idx.shape[-1], device=q.device)
    ok = (idx >= 0) & (idx < T) & (pos < (idx.shape[-1] if valid is None else valid[..., None]))  # (B, H, k)
    safe = torch.where(ok, idx, 0).long()
    b = torch.arange(B, device=q.device)[:, None, None]
    ks, vs = K[b, heads[None, :, None], safe].float(), V[b, heads[None, :, None], safe].float()  # (B, H, k, D)
    s = torch.einsum("bhd,bhkd->bhk", q.float(), ks) * (D ** -0.5 if scale is None else scale)
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)  # all-padding rows -> 0
    return torch.einsum("bhk,bhkd->bhd", p, vs).to(q.dtype)


def matmul_error_bound(x: torch.Tensor, weight: torch.Tensor, bias=None, unit: float = 2.0 ** -24,
                       extra: int = 4) -> torch.Tensor:
    """Elementwise bound on |y - (x @ W^T + b)| for any evaluation order of y in floating point of unit
    roundoff ``unit`` (fp32: 2**-24): a K-term dot product accumulates at most (K - 1) roundings of
    partial sums no larger than sum |x_k W_k| (the first-order gamma_K bound), plus ``extra`` single
    roundings (the dequantization product, a group's scale, the bias add). Tests compare two
    implementations with twice this bound (each may err by it), in float64. Returns (..., out)."""
    terms = x.double().abs() @ weight.double().abs().T  # (..., out)
    if bias is not None:
        terms = terms + bias.double().abs()
    return (x.shape[-1] + extra) * unit * terms
