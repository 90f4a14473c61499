"""Name -> implementation dicts. Each implementation module registers itself on import.

``PRUNERS``: method name -> `sparsify.pruners.base.Pruner`
``FORMATS``: packed format name -> `sparsify.formats.base.Format`
``ACCUMULATORS``: statistic name -> accumulator class (``add_batch(x)``, see calibrate/stats.py)
"""
from __future__ import annotations

PRUNERS: dict = {}
FORMATS: dict = {}
ACCUMULATORS: dict = {}


def _load_all() -> None:
    import sparsify.calibrate.stats  # noqa: F401
    import sparsify.formats  # noqa: F401
    import sparsify.pruners  # noqa: F401


def get(table: dict, name: str, what: str):
    _load_all()
    if name not in table:
        from sparsify.errors import UserError

        raise UserError(f"unknown {what} {name!r}: choose one of {', '.join(sorted(table))}")
    return table[name]
