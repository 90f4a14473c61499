"""Magnitude pruning: score |W|. Data-free; per row or per layer, N:M, or blocks."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsify.pruners.base import Pruner
from sparsify.pruners.masks import apply_mask, mask_for
from sparsify.tables import PRUNERS


@dataclass
class MagnitudeConfig:
    """No hyper-parameters: the score is the weight itself."""


def prune(weight: torch.Tensor, stats, scheme, sparsity: float, per: str, config: MagnitudeConfig) -> torch.Tensor:
    """(out, in) weight with +0.0 at the smallest |W|; ``stats`` is unused (None)."""
    score = weight.float().abs()  # (out, in)
    return apply_mask(weight, mask_for(score, scheme, sparsity, per))


PRUNERS["magnitude"] = Pruner("magnitude", MagnitudeConfig, None, prune, "|W|, no calibration data")
