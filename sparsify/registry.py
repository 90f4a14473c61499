"""Name -> implementation lookup. The dicts live in `sparsify.tables` (a leaf module the
implementations register into on import); this module imports the implementations, then looks up.

``PRUNERS``: method name -> `sparsify.pruners.base.Pruner`
``FORMATS``: packed format name -> `sparsify.formats.base.Format`
``ACCUMULATORS``: statistic name -> accumulator class (``add_batch(x)``, see calibrate/stats.py)
``ALLOCATORS``: allocation name -> `sparsify.allocators.base.Allocator`
"""
from __future__ import annotations

from sparsify.tables import ACCUMULATORS, ALLOCATORS, FORMATS, PRUNERS, lookup

__all__ = ["ACCUMULATORS", "ALLOCATORS", "FORMATS", "PRUNERS", "get", "load_all"]


def load_all() -> None:
    """Import every implementation module, so that the tables are complete."""
    import sparsify.allocators  # noqa: F401
    import sparsify.calibrate.stats  # noqa: F401
    import sparsify.formats  # noqa: F401
    import sparsify.pruners  # noqa: F401


def get(table: dict, name: str, what: str):
    """``table[name]`` once every implementation is imported; UserError listing the known names."""
    load_all()
    return lookup(table, name, what)
