"""Bytes of KV cache one decoded token reads, dense attention against Double Sparsity (analytic).

Per sparse layer and decoded token, with T cached tokens, head size d, kv heads KV, query heads H,
cache items of ``itemsize`` bytes, r label channels of ``bits`` bits and k selected tokens:

  dense   = KV * T * d * 2 * itemsize                        (all of K and V)
  labels  = KV * T * ceil(r * bits / 8)                       (the label cache; 4-bit codes two a byte)
  meta    = KV * T * 2 * itemsize  when bits < 16, per token   (a scale and a zero point per token)
          = KV * r * 2 * 4         when bits < 16, per channel (the fp32 calibrated grid, not per token)
  gather  = S * k * d * 2 * itemsize                          (K and V rows of the selected tokens)

S is KV when one selection serves the query heads of a kv head (``select`` "max", "union" or "sum": a kernel
reads each selected row once per group) and H when every query head selects its own tokens ("head").
The first ``dense_layers`` blocks read like dense. The kernels of `sparsify.kernels.triton.ds_attention`
count the bytes they load, and `kv_bytes_read` states the same terms per call (a selection shared per kv
head, idx (B, KVH, k), loads each row once for the group): tests hold the three to one another.
"Level" follows METHODS.md: token sparsity k / T and label sparsity r * bits / (d * 16).
"""
from __future__ import annotations

import math


def kv_bytes(shape: dict, config, context: int, itemsize: int = 2) -> dict:
    """Analytic KV bytes per decoded token at ``context`` cached tokens.

    ``shape``: {"blocks", "heads", "kv_heads", "head_dim"} of the model; ``itemsize``: bytes per cache value.
    """
    d, kv, heads, blocks = shape["head_dim"], shape["kv_heads"], shape["heads"], shape["blocks"]
    r = config.channel_count(d)
    k = min(context, config.token_budget(context))
    bits = config.label_bits
    readers = heads if config.select == "head" else kv
    dense = kv * context * d * 2 * itemsize
    labels = kv * context * math.ceil(r * bits / 8)
    meta = 0 if bits >= 16 else kv * context * 2 * itemsize if config.label_scale == "token" else kv * r * 2 * 4
    gather = readers * k * d * 2 * itemsize
    sparse = labels + meta + gather
    dense_blocks = min(config.dense_layers, blocks)
    model_dense = blocks * dense
    model_sparse = dense_blocks * dense + (blocks - dense_blocks) * sparse
    return {"context": context, "k": k, "channels": r, "label_bits": bits, "label_scale": config.label_scale,
            "kv_itemsize": itemsize,
            "select": config.select, "token_sparsity": k / context, "label_sparsity": r * bits / (d * 16),
            "per_sparse_layer": {"dense": dense, "labels": labels, "label_meta": meta, "gather": gather,
                                 "sparse": sparse, "ratio": sparse / dense,
                                 "ratio_without_meta": (labels + gather) / dense},
            "model": {"dense": model_dense, "sparse": model_sparse, "ratio": model_sparse / model_dense,
                      "dense_blocks": dense_blocks}}
