"""Shared Triton device code: decompress a (BLOCK_O, BLOCK_K) tile of an N:M packed weight in registers.

Layout (see `sparsify.formats.nm`): for dense column k of row o, the j-th kept value of its group is
packed index j = (k // M) * N + n (n = 0..N-1); its in-group position sits in meta byte (j*B)//8 at
bit (j*B) % 8. The dense tile is the sum over n of value_j where position_j == k % M, so no dense
weight is ever written to memory; values are re-read N times from cache, but fetched from DRAM once.
"""
import triton
import triton.language as tl


@triton.jit
def packed_tile(vals_ptr, meta_ptr, scale_ptr, zero_ptr, offs_o, offs_k, o_ok, k_ok,
                stride_v, stride_m, stride_s,
                N: tl.constexpr, M: tl.constexpr, B: tl.constexpr,
                QUANT: tl.constexpr, GROUP: tl.constexpr, ZERO: tl.constexpr, HAS_ZERO: tl.constexpr):
    """(BLOCK_O, BLOCK_K) float32 dense tile. QUANT: 0 float values, 1 int8 codes, 2 int4 codes
    (two per byte, low nibble first), 3 fp8 codes; dequant = (code - zero) * scale[o, k // GROUP]."""
    ok = o_ok[:, None] & k_ok[None, :]
    pos = offs_k % M  # (BLOCK_K,)
    w = tl.zeros((offs_o.shape[0], offs_k.shape[0]), dtype=tl.float32)
    keep = w != 0.0  # all False: positions that hold a stored value
    for n in tl.static_range(N):
        j = (offs_k // M) * N + n  # (BLOCK_K,) packed index
        byte = tl.load(meta_ptr + offs_o[:, None] * stride_m + ((j * B) // 8)[None, :], mask=ok, other=0)
        hit = ((byte.to(tl.int32) >> ((j * B) % 8)[None, :]) & ((1 << B) - 1)) == pos[None, :]
        hit = hit & ok
        if QUANT == 2:
            raw = tl.load(vals_ptr + offs_o[:, None] * stride_v + (j // 2)[None, :], mask=ok, other=0)
            v = ((raw.to(tl.int32) >> ((j % 2) * 4)[None, :]) & 15).to(tl.float32)
        else:
            v = tl.load(vals_ptr + offs_o[:, None] * stride_v + j[None, :], mask=ok).to(tl.float32)  # no `other`: fp8
        w += tl.where(hit, v, 0.0)
        keep |= hit
    if QUANT != 0:
        sidx = offs_o[:, None] * stride_s + (offs_k // GROUP)[None, :]
        scale = tl.load(scale_ptr + sidx, mask=ok, other=0.0)
        if HAS_ZERO:
            zero = tl.load(zero_ptr + sidx, mask=ok, other=0).to(tl.float32)
        else:
            zero = ZERO
        w = tl.where(keep, (w - zero) * scale, 0.0)
    return w
