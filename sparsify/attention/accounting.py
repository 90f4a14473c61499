"""Bytes of KV cache one decoded token reads, dense attention against Double Sparsity (analytic).

Per sparse layer and decoded token, with T cached tokens, head size d, kv heads KV, query heads H,
cache items of ``itemsize`` bytes, r label channels of ``bits`` bits and k selected tokens:

  dense   = KV * T * d * 2 * itemsize                        (all of K and V)
  labels  = KV * T * ceil(r * bits / 8)                       (the label cache; 4-bit codes two a byte)
  meta    = KV * T * 2 * itemsize  when bits < 16             (a scale and a zero point per token)
  gather  = S * k * d * 2 * itemsize                          (K and V rows of the selected tokens)

S is KV when one selection serves the query heads of a kv head (``select`` "union" or "sum": a kernel
reads each selected row once per group) and H when every query head selects its own tokens ("head").
The first ``dense_layers`` blocks read like dense. `sparsify.kernels.triton.ds_attention.kv_bytes_read`
counts the same terms per kernel call (its gather loads rows per query head, so it counts H).
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
    meta = kv * context * 2 * itemsize if bits < 16 else 0
    gather = readers * k * d * 2 * itemsize
    sparse = labels + meta + gather
    dense_blocks = min(config.dense_layers, blocks)
    model_dense = blocks * dense
    model_sparse = dense_blocks * dense + (blocks - dense_blocks) * sparse
    return {"context": context, "k": k, "channels": r, "label_bits": bits, "kv_itemsize": itemsize,
            "select": config.select, "token_sparsity": k / context, "label_sparsity": r * bits / (d * 16),
            "per_sparse_layer": {"dense": dense, "labels": labels, "label_meta": meta, "gather": gather,
                                 "sparse": sparse, "ratio": sparse / dense,
                                 "ratio_without_meta": (labels + gather) / dense},
            "model": {"dense": model_dense, "sparse": model_sparse, "ratio": model_sparse / model_dense,
                      "dense_blocks": dense_blocks}}
