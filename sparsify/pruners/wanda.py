"""Wanda (Sun et al. 2023): score |W_ij| * ||X_:,j||_2, no weight update; per output row by default."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsify.pruners.base import Pruner
from sparsify.pruners.masks import apply_mask, mask_for
from sparsify.registry import PRUNERS


@dataclass
class WandaConfig:
    pass


def prune(weight: torch.Tensor, stats, scheme, sparsity: float, per: str, config: WandaConfig) -> torch.Tensor:
    score = weight.float().abs() * stats.norms()[None, :].to(weight.device)  # (out, in)
    return apply_mask(weight, mask_for(score, scheme, sparsity, per))


PRUNERS["wanda"] = Pruner("wanda", WandaConfig, "colnorm", prune, "|W| x input-column norm")
