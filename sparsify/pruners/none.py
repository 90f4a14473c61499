"""``--method none``: no weight pruning. Every target is copied unchanged (stored as it was, not
packed), so a run can add only what is not weight pruning, e.g. ``--attention double-sparsity``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsify.pruners.base import Pruner
from sparsify.tables import PRUNERS


@dataclass
class NoneConfig:
    """No hyper-parameters."""


def prune(weight: torch.Tensor, stats, scheme, sparsity: float, per: str, config: NoneConfig) -> torch.Tensor:
    """The weight itself (never called by the pipeline: `keeps_weights` skips these layers)."""
    return weight


PRUNERS["none"] = Pruner("none", NoneConfig, None, prune, "no weight pruning: weights copied unchanged",
                         keeps_weights=True)
