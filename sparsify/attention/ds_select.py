"""``--ds-statistic auto``: pick the channel statistic whose sparse attention loses least.

Small models do not always rank channels best by the paper's |q_c k_c| (issue 12), so each
candidate (qk, q, k) is scored on held-out calibration windows: windows of the calibration text
that overlap none of the windows the rankings were computed from. The loss is KL(dense || sparse),
nats per predicted token: the same model with its dense attention against the same model with
Double Sparsity installed, so weight pruning (when combined) does not enter the comparison.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsify.attention import ds_runtime
from sparsify.attention.double_sparsity import CANDIDATES, DoubleSparsityConfig, label_ranges, rankings
from sparsify.errors import UserError


def holdout_windows(tokenizer, text: str, n: int, seq_len: int, calib_samples: int, seed: int) -> torch.Tensor:
    """(n, seq_len) windows of ``text`` disjoint from the ``calib_samples`` windows that seed ``seed`` drew.

    The calibration draw is reproduced exactly (`calibrate.data.text_windows`: seeded uniform starts),
    then candidates from seed + 1 are kept when they overlap none of them.
    """
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)  # (N,)
    span = ids.numel() - seq_len
    if span <= 0:
        raise UserError(f"the calibration text has {ids.numel()} tokens: too few for held-out windows of {seq_len}")
    used = torch.randint(0, span, (calib_samples,), generator=torch.Generator().manual_seed(seed))  # (S,)
    draw = torch.randint(0, span, (max(64, 16 * n),), generator=torch.Generator().manual_seed(seed + 1))
    free = [int(s) for s in draw if bool(((s - used).abs() >= seq_len).all())]
    if len(free) < n:
        raise UserError(f"the calibration text leaves {len(free)} windows of {seq_len} tokens outside the calibration "
                        f"windows, {n} needed: pass more text (--calib) or fewer / shorter samples")
    starts = torch.tensor(free[:n])
    return ids[starts[:, None] + torch.arange(seq_len)]  # (n, seq_len)


@torch.inference_mode()
def candidate_losses(model, windows: torch.Tensor, stats: dict, config: DoubleSparsityConfig,
                     candidates=CANDIDATES) -> dict[str, float]:
    """{statistic: mean KL(dense || double sparsity) per predicted token} over ``windows`` (n, T)."""
    device = next(model.parameters()).device
    ranked = {c: rankings(stats, c, config.seed) for c in candidates}
    ranges = label_ranges(stats)
    total = {c: 0.0 for c in candidates}
    count = 0
    ds_runtime.uninstall(model)
    try:
        for window in windows:
            ids = window[None].to(device)  # (1, T)
            dense = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # (T-1, vocab)
            for c in candidates:
                ds_runtime.install(model, ranked[c], config, ranges)
                sparse = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # (T-1, vocab)
                ds_runtime.uninstall(model)
                total[c] += float((dense.exp() * (dense - sparse)).sum())
            count += dense.shape[0]
    finally:
        ds_runtime.uninstall(model)
    return {c: total[c] / max(1, count) for c in candidates}


def choose(loaded, stats: dict, config: DoubleSparsityConfig, calib, seq_len: int) -> tuple[str, dict]:
    """(chosen statistic, what was measured) for ``statistic auto``; the lowest loss wins (ties: qk, q, k order)."""
    from sparsify.calibrate.data import load_text

    windows = holdout_windows(loaded.tokenizer, load_text(calib.source, "calib"), config.holdout, seq_len,
                              calib.samples, calib.seed)
    losses = candidate_losses(loaded.model, windows, stats, config)
    best = min(CANDIDATES, key=lambda c: (losses[c], CANDIDATES.index(c)))
    info = {"loss": "KL(dense attention || double sparsity), nats per predicted token",
            "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
            "data": f"{calib.source} calibration text, windows disjoint from the calibration windows",
            "losses": {c: round(v, 6) for c, v in losses.items()}, "chosen": best}
    if isinstance(config.tokens, int) and config.tokens >= seq_len:
        info["note"] = (f"--ds-tokens {config.tokens} >= the held-out window length {seq_len}: every query sees its "
                        "whole context, so the candidates tie; raise --seq-len to compare them")
    return best, info
