"""Double Sparsity attention at run time, plugged into transformers' attention interface.

`install(model, channels, config)` registers an attention function under ``sparsify_ds_<original>``
in ``ALL_ATTENTION_FUNCTIONS`` (and the original implementation's mask builder under the same name
in ``ALL_MASK_ATTENTION_FUNCTIONS``, so that the masks stay what the model built before) and points
the model's config at it. Each attention module carries a `LayerState`; modules without one, and
the first ``dense_layers`` blocks, call the original implementation (sdpa, eager, ...) unchanged.

For every query position (a whole sequence: the decode simulation, where position i sees only its
own top-k among tokens <= i; or a `generate()` step over the cache) the sparse path

1. reads the labels, K restricted to the layer's r calibrated channels per kv head, rounded as the
   runtime would store them (fp16, or 8 / 4-bit codes on a per-channel calibrated or per-token grid:
   `quantize_labels`);
2. scores every allowed token approximately, q_r . K_r / sqrt(r), per query head;
3. keeps the first ``sink`` and last ``recent`` allowed tokens and fills the budget k with the best
   approximate scores (`select_tokens`): by default one selection per kv head, filled round-robin
   from the rankings of its query heads (``select="union"``; ``"sum"`` ranks by their summed scores,
   ``"head"`` selects per query head); a query whose context holds at most k tokens sees all;
4. computes exact softmax attention with full q, K, V over the selected tokens only.

On CPU this is plain torch over (Tq, Tk) score matrices (the same work as dense eager attention,
plus a top-k). On CUDA a single-token decode step may go through the Triton kernels
(`sparsify.kernels.triton.ds_attention`) when they import: UNTESTED, no GPU was available when it
was written; ``SPARSIFY_DS_KERNELS=0`` keeps the torch path.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch

from sparsify.attention.double_sparsity import DoubleSparsityConfig, attention_modules
from sparsify.errors import UserError

PREFIX = "sparsify_ds_"
CHUNK = 256  # query rows per step of the decode simulation (bounds the (Tq, Tk) score matrices)


@dataclass
class LayerState:
    """What one attention module needs: its channels (None: dense), the options, the original implementation."""

    channels: torch.Tensor | None  # (kv_heads, r) int64 channel indices, or None for a dense layer
    config: DoubleSparsityConfig
    original: str
    label_range: torch.Tensor | None = None  # (2, kv_heads, r) calibrated [min; max] of those channels


def quantize_labels(x: torch.Tensor, bits: int, label_range: torch.Tensor | None = None) -> torch.Tensor:
    """Labels (B, KV, T, r) as the label cache would hold them, back in fp32.

    16 bits: fp16. 8 / 4 bits: round-to-nearest with an integer zero point over each token's
    [min(x, 0), max(x, 0)], or with ``label_range`` (2, KV, r) over each channel's calibrated range
    (values beyond it clip): `kernels.reference.ds_label_grid`, the layout the kernels read.
    """
    if bits >= 16:
        return x.float().to(torch.float16).float()
    from sparsify.kernels.reference import ds_label_grid

    bounds = (None, None) if label_range is None else (label_range[0][None, :, None], label_range[1][None, :, None])
    codes, scale, zero = ds_label_grid(x, bits, *bounds)  # (B, KV, T, r), scale / zero broadcastable
    return (codes - zero) * scale


def allowed_keys(mask, batch: int, tq: int, tk: int, device) -> torch.Tensor:
    """Which keys each query may see, (B, 1 or H, Tq, Tk) bool, from whatever mask transformers built.

    None: causal, the queries being the last Tq positions; 4-D bool: as is; 4-D float: additive
    (0 kept, the dtype's minimum masked); 2-D (B, Tk): padding, combined with causal.
    """
    q_pos = torch.arange(tq, device=device) + (tk - tq)  # (Tq,)
    causal = torch.arange(tk, device=device)[None, :] <= q_pos[:, None]  # (Tq, Tk)
    if mask is None:
        return causal[None, None].expand(batch, 1, tq, tk)
    if mask.dim() == 2:
        return causal[None, None] & mask.bool()[:, None, None, -tk:]  # (B, 1, Tq, Tk)
    if mask.dim() != 4:
        raise UserError(f"double sparsity got an attention mask of shape {list(mask.shape)}: unsupported")
    mask = mask[..., -tq:, -tk:]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _budget(allowed: torch.Tensor, config: DoubleSparsityConfig):
    """(fixed (B, 1, Tq, Tk) sink + recent tokens, candidates (B, 1, Tq, Tk), heavy (B, 1, Tq, 1) top-k picks)."""
    count = allowed.sum(-1, keepdim=True)  # (B, 1, Tq, 1) tokens in each query's context
    rank = allowed.cumsum(-1)  # (B, 1, Tq, Tk) 1-based position among the allowed keys
    fixed = allowed & ((rank <= config.sink) | (count - rank < config.recent))  # (B, 1, Tq, Tk)
    if isinstance(config.tokens, int):
        budget = torch.full_like(count, config.tokens)
    else:
        budget = torch.ceil(count.double() * config.tokens).long().clamp(min=1)  # (B, 1, Tq, 1)
    heavy = (budget - fixed.sum(-1, keepdim=True)).clamp(min=0)  # (B, 1, Tq, 1)
    return fixed, allowed & ~fixed, heavy


def max_probability(approx: torch.Tensor, allowed: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """(B, KV, g, Tq, Tk) approximate scores -> (B, KV, 1, Tq, Tk): per token, the largest log attention
    probability any query head of the group would give it, softmax over the allowed (B, 1, 1, Tq, Tk) keys
    of ``approx * logit_scale`` (the estimated logits)."""
    logits = (approx * logit_scale).masked_fill(~allowed, float("-inf"))  # (B, KV, g, Tq, Tk)
    log_p = logits - logits.logsumexp(-1, keepdim=True)
    return log_p.amax(2, keepdim=True).nan_to_num(float("-inf"))  # a query with no key: all -inf


def _guarded_max_probability(approx, allowed, candidates, heavy, logit_scale) -> torch.Tensor:
    """``max``'s ranking, (B, KV, 1, Tq, Tk): `max_probability`, with +inf on every head's own best
    heavy // (2 g) candidates (B, 1, 1, Tq, Tk), so that they are taken first."""
    g = approx.shape[2]
    ranking = max_probability(approx, allowed, logit_scale)  # (B, KV, 1, Tq, Tk)
    own = heavy // (2 * g)  # (B, 1, 1, Tq, 1) tokens each head keeps of its own
    m = min(int(own.max()) if own.numel() else 0, approx.shape[-1])
    if m == 0 or g == 1:
        return ranking
    top = approx.masked_fill(~candidates, float("-inf")).topk(m, dim=-1).indices  # (B, KV, g, Tq, m)
    first = (torch.arange(m, device=approx.device) < own).int().expand(top.shape)  # (B, KV, g, Tq, m)
    votes = torch.zeros_like(ranking[:, :, 0], dtype=torch.int32)  # (B, KV, Tq, Tk)
    votes.scatter_add_(-1, top.transpose(2, 3).flatten(3), first.transpose(2, 3).flatten(3))
    return ranking.masked_fill((votes > 0)[:, :, None] & candidates, float("inf"))


def select_tokens(approx: torch.Tensor, allowed: torch.Tensor, config: DoubleSparsityConfig,
                  logit_scale: float = 1.0) -> torch.Tensor:
    """Approximate scores (B, KV, G, Tq, Tk) -> the tokens each query attends to, (B, KV, 1 or g, Tq, Tk) bool.

    Sink (first ``sink`` allowed) and recent (last ``recent`` allowed) tokens always; then, among the
    other allowed tokens, until k = ``config.token_budget(context)``:
      ``max``   (G = g): shared by the group; each query head first keeps its own best k' // (2 g)
                tokens (k' the budget left after sink and recent), then the rest goes to the tokens
                with the highest attention probability under any of the heads (`max_probability`;
                ``logit_scale`` turns ``approx`` into the estimated logits): a head whose attention is
                diffuse claims few tokens beyond its own, a head with a sharp peak keeps it;
      ``sum``   (G = 1, the group's scores summed): the top scores, shared by the group;
      ``head``  (G = g): each query head its own top scores;
      ``union`` (G = g): shared by the group, filled round-robin from each head's own ranking (head 0's
                best token, head 1's best, ..., then every head's second best, ...; a token already
                taken is skipped).
    ``allowed`` is (B, 1, Tq, Tk).
    """
    fixed, candidates, heavy = _budget(allowed[:, None], config)  # (B, 1, 1, Tq, Tk|1)
    if config.select == "max":
        approx = _guarded_max_probability(approx, allowed[:, None], candidates, heavy, logit_scale)
    shared = config.select != "head"
    b, kv, g, tq, tk = approx.shape
    chosen = fixed.expand(b, kv, 1 if shared else g, tq, tk).clone()  # (B, KV, 1|g, Tq, Tk)
    kmax = int(torch.minimum(heavy, candidates.sum(-1, keepdim=True)).max()) if heavy.numel() else 0
    if kmax == 0:
        return chosen
    scores = approx.masked_fill(~candidates, float("-inf"))  # (B, KV, G, Tq, Tk)
    idx = scores.topk(kmax, dim=-1).indices  # (B, KV, G, Tq, kmax) each head's (or the sum's) best first
    del scores
    if config.select == "union" and g > 1:
        # a token's place in the round-robin: rank * g + head of its best appearance (unique per token)
        rank = torch.arange(kmax, device=approx.device, dtype=torch.int32)[None, None, None, None] * g
        place = (rank + torch.arange(g, device=approx.device, dtype=torch.int32)[None, None, :, None, None])
        best = torch.full((b, kv, tq, tk), kmax * g, dtype=torch.int32, device=approx.device)  # (B, KV, Tq, Tk)
        best.scatter_reduce_(-1, idx.transpose(2, 3).flatten(3), place.expand(idx.shape).transpose(2, 3).flatten(3),
                             reduce="amin")
        order = (-best.float()).masked_fill(~candidates[:, :, 0], float("-inf"))  # earliest place first
        idx = order.topk(kmax, dim=-1).indices[:, :, None]  # (B, KV, 1, Tq, kmax)
    keep = torch.arange(kmax, device=approx.device) < heavy  # (B, 1, 1, Tq, kmax)
    picked = torch.zeros_like(chosen).scatter_(-1, idx, keep.expand(idx.shape))
    return chosen | (picked & candidates)


def key_labels(key: torch.Tensor, channels: torch.Tensor, bits: int, label_range=None) -> torch.Tensor:
    """The label cache: (B, KV, Tk, D) keys -> (B, KV, r, Tk) fp32, the r channels rounded as stored."""
    b, kv, tk, _ = key.shape
    r = channels.shape[1]
    labels = torch.gather(key.float(), 3, channels[None, :, None, :].expand(b, kv, tk, r))  # (B, KV, Tk, r)
    return quantize_labels(labels, bits, label_range).transpose(-1, -2)  # (B, KV, r, Tk)


def query_labels(query: torch.Tensor, channels: torch.Tensor, select: str) -> torch.Tensor:
    """(B, H, Tq, D) queries -> their label channels / sqrt(r), (B, KV, G, Tq, r) fp32: G = 1, summed over
    the kv head's query heads, for ``select="sum"``; else G = g, one row per query head."""
    b, heads, tq, d = query.shape
    kv, r = channels.shape
    q = query.float().reshape(b, kv, heads // kv, tq, d)  # (B, KV, g, Tq, D)
    index = channels[None, :, None, None, :].expand(*q.shape[:4], r)
    q_lab = torch.gather(q, 4, index) / math.sqrt(r)  # (B, KV, g, Tq, r)
    return q_lab.sum(2, keepdim=True) if select == "sum" else q_lab


def sparse_attention(query, key, value, allowed, channels, config: DoubleSparsityConfig, scaling: float,
                     softcap: float | None = None, chunk: int = CHUNK, label_range=None) -> torch.Tensor:
    """Double Sparsity attention of (B, H, Tq, D) queries over (B, KV, Tk, D) keys / values.

    ``allowed`` (B, 1, Tq, Tk) bool: each query's context. Returns (B, Tq, H, D) in the query's dtype
    (the layout transformers' attention functions return). Queries run ``chunk`` at a time, each
    chunk over the keys up to its last allowed one only (a causal chunk needs no later key).
    ``label_range`` (2, KV, r): the calibrated per-channel grid when ``config.needs_ranges``.
    """
    b, heads, tq, d = query.shape
    kv = key.shape[1]
    g = heads // kv
    k_lab = key_labels(key, channels, config.label_bits, label_range)[:, :, None]  # (B, KV, 1, r, Tk)
    logit_scale = math.sqrt(channels.shape[1]) * scaling  # approx = q_r . K_r / sqrt(r) -> estimated logits
    q_lab = query_labels(query, channels, config.select)  # (B, KV, G, Tq, r)
    q = (query.float() * scaling).reshape(b, kv, g, tq, d)  # (B, KV, g, Tq, D)
    keys, values = key.float()[:, :, None], value.float()[:, :, None]  # (B, KV, 1, Tk, D)
    allowed = allowed[:, :1]
    outs = []
    for start in range(0, tq, chunk):
        stop = min(tq, start + chunk)
        rows = allowed[:, :, start:stop]  # (B, 1, C, Tk)
        seen = rows.any(-2).flatten(0, -2).any(0).nonzero()  # keys any query of the chunk may see
        n = int(seen.max()) + 1 if seen.numel() else 1
        approx = q_lab[:, :, :, start:stop] @ k_lab[..., :n]  # (B, KV, G, C, n)
        chosen = select_tokens(approx, rows[..., :n], config, logit_scale)  # (B, KV, 1|g, C, n)
        del approx
        scores = q[:, :, :, start:stop] @ keys[:, :, :, :n].transpose(-1, -2)  # (B, KV, g, C, n)
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        scores.masked_fill_(~chosen, float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # (B, KV, g, C, n)
        if not bool(chosen.any(-1).all()):
            probs = probs.nan_to_num(0.0)  # a query with no token (padding) outputs zeros
        outs.append(probs @ values[:, :, :, :n])  # (B, KV, g, C, D)
    out = torch.cat(outs, dim=3).view(b, heads, tq, d)  # (B, H, Tq, D)
    return out.transpose(1, 2).to(query.dtype)  # (B, Tq, H, D)


def _original_function(module, original: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if original in (None, "eager"):
        return eager or ALL_ATTENTION_FUNCTIONS["sdpa"]
    return ALL_ATTENTION_FUNCTIONS.get_interface(original, eager)


def _kernels():
    """The Triton decode kernels, or None (no CUDA, not importable, or SPARSIFY_DS_KERNELS=0)."""
    if os.environ.get("SPARSIFY_DS_KERNELS", "1") == "0" or not torch.cuda.is_available():
        return None
    try:
        from sparsify.kernels.reference import ds_quantize_labels_ref
        from sparsify.kernels.triton.ds_attention import gather_attention, label_scores as kernel_scores
    except Exception:  # noqa: BLE001 - any import failure means: use the torch path
        return None
    return kernel_scores, gather_attention, ds_quantize_labels_ref


def _cuda_decode_step(query, key, value, allowed, state: LayerState, scaling: float, kernels):
    """One decode step (Tq = 1) through the Triton kernels. UNTESTED (no GPU when written).

    The labels are gathered and rounded from K at every step here; a serving runtime keeps them
    in a label cache filled once per token instead.
    """
    kernel_scores, gather_attention, quantize = kernels
    cfg, channels = state.config, state.channels
    b, heads, _, d = query.shape
    kv, tk, r = key.shape[1], key.shape[2], channels.shape[1]
    g = heads // kv
    labels = torch.gather(key, 3, channels[None, :, None, :].expand(b, kv, tk, r))  # (B, KV, Tk, r)
    q_lab = torch.gather(query[:, :, 0], 2, channels.repeat_interleave(g, 0)[None].expand(b, heads, r))  # (B, H, r)
    if cfg.label_bits < 16:
        codes, scale, zero = quantize(labels, cfg.label_bits, state.label_range)  # scale / zero per channel or token
        approx = kernel_scores(q_lab, codes, label_scale=scale, label_zero=zero, bits=cfg.label_bits)  # (B, H, Tk)
    else:
        approx = kernel_scores(q_lab, labels.to(torch.float16).to(query.dtype))  # (B, H, Tk)
    approx = approx.view(b, kv, g, 1, tk)  # (B, KV, g, 1, Tk)
    if cfg.select == "sum":
        approx = approx.sum(2, keepdim=True)  # (B, KV, 1, 1, Tk)
    chosen = select_tokens(approx, allowed[:, :1], cfg, math.sqrt(r) * scaling)  # (B, KV, 1|g, 1, Tk)
    chosen = chosen.reshape(b, -1, tk)  # (B, KV, Tk) one selection per kv head, or (B, H, Tk) per query head
    valid = chosen.sum(-1)  # (B, KV | H)
    idx = torch.sort(chosen.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :int(valid.max())]
    out = gather_attention(query[:, :, 0], key, value, idx, valid, scale=scaling)  # (B, H, D): shared rows read once
    return out[:, None]  # (B, 1, H, D)


def attention(module, query, key, value, attention_mask, *, original: str, **kwargs):
    """The registered attention function (see the module docstring); returns (output (B, Tq, H, D), None)."""
    state = getattr(module, "_sparsify_ds", None)
    if state is None or state.channels is None:
        return _original_function(module, original)(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("s_aux") is not None:
        raise UserError("double sparsity does not support attention sinks as parameters (s_aux): drop --attention")
    b, heads, tq, d = query.shape
    scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or d ** -0.5
    softcap = kwargs.get("softcap")
    channels = state.channels.to(query.device)
    label_range = None if state.label_range is None else state.label_range.to(query.device)
    allowed = allowed_keys(attention_mask, b, tq, key.shape[2], query.device)  # (B, 1|H, Tq, Tk)
    if tq == 1 and query.is_cuda and not softcap and (kernels := _kernels()) is not None:
        return _cuda_decode_step(query, key, value, allowed, LayerState(channels, state.config, original, label_range),
                                 scaling, kernels), None
    return sparse_attention(query, key, value, allowed, channels, state.config, scaling, softcap,
                            label_range=label_range), None


def _register(original: str) -> str:
    """Register the attention function and the original's mask builder under ``sparsify_ds_<original>``."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS:
        def function(module, query, key, value, attention_mask, **kwargs):
            return attention(module, query, key, value, attention_mask, original=original, **kwargs)

        AttentionInterface.register(name, function)
        mask_original = original if original in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping else "sdpa"
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[mask_original])
    return name


def attention_layers(model) -> list:
    """The model's attention modules that go through the interface, in block order (one per block; found
    by module, not through `find_blocks`, which needs Linears: a loaded artifact holds SparseLinears)."""
    return [module for _, module in attention_modules(model)]


def install(model, channels: dict[int, torch.Tensor], config: DoubleSparsityConfig,
            ranges: dict[int, torch.Tensor] | None = None) -> None:
    """Make ``model`` run Double Sparsity attention: block i >= ``dense_layers`` uses the first r of
    ``channels[i]`` ((kv_heads, head_dim) rankings) and, for a per-channel label grid, ``ranges[i]``
    ((2, kv_heads, head_dim) calibrated [min; max], `double_sparsity.label_ranges`); earlier blocks
    stay dense. Idempotent; `uninstall` undoes it."""
    if config.needs_ranges and ranges is None:
        raise UserError("double sparsity: per-channel label quantization needs the calibrated channel ranges; "
                        "re-run 'sparsify prune --attention double-sparsity' or pass --ds-label-scale token")
    uninstall(model)
    layers = attention_layers(model)
    if not layers:
        raise UserError("double sparsity: no attention module of this model goes through transformers' attention "
                        "interface: drop --attention")
    if len(layers) != len(channels):
        raise UserError(f"double sparsity: {len(channels)} channel rankings for {len(layers)} attention layers: "
                        "the artifact does not match its model; re-run 'sparsify prune'")
    configs = {}
    for i, module in enumerate(layers):
        cfg = module.config
        configs.setdefault(id(cfg), (cfg, cfg._attn_implementation or "sdpa"))
        sparse = i >= config.dense_layers
        r = config.channel_count(module.head_dim)
        ranking = channels[i][:, :r].long().contiguous() if sparse else None
        grid = None
        if sparse and config.needs_ranges:  # (2, kv, r): the range of each chosen channel
            grid = torch.gather(ranges[i].float(), 2, ranking[None].expand(2, *ranking.shape)).contiguous()
        module._sparsify_ds = LayerState(ranking, config, configs[id(cfg)][1], grid)
    for cfg, original in configs.values():
        cfg._attn_implementation = _register(original)


def uninstall(model) -> None:
    """Restore the original attention implementation (no-op when nothing is installed)."""
    for module in model.modules():
        state = module.__dict__.pop("_sparsify_ds", None)
        cfg = getattr(module, "config", None)
        if state is not None and str(getattr(cfg, "_attn_implementation", "")).startswith(PREFIX):
            cfg._attn_implementation = state.original


def installed(model) -> bool:
    return any("_sparsify_ds" in m.__dict__ for m in model.modules())
