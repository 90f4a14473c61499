"""Wanda (Sun et al. 2023): score |W_ij| * ||X_:,j||_2, no weight update.

Per output row by default (Wanda's choice: rows compete only with themselves), or one threshold per
layer, N:M groups, or R x C blocks. The column norms come from `ColumnNorm` and are off by the
constant 1/sqrt(tokens), which changes no ranking.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsify.pruners.base import Pruner
from sparsify.pruners.masks import apply_mask, mask_for
from sparsify.tables import PRUNERS


@dataclass
class WandaConfig:
    """No hyper-parameters: the score is fixed by the paper."""


def prune(weight: torch.Tensor, stats, scheme, sparsity: float, per: str, config: WandaConfig) -> torch.Tensor:
    """(out, in) weight with +0.0 at the lowest-scored entries; ``stats`` is the layer's ColumnNorm."""
    score = weight.float().abs() * stats.norms()[None, :].to(weight.device)  # (out, in)
    return apply_mask(weight, mask_for(score, scheme, sparsity, per))


PRUNERS["wanda"] = Pruner("wanda", WandaConfig, "colnorm", prune, "|W| x input-column norm")
