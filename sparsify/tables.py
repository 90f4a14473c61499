"""The name -> implementation dicts, filled by the implementation modules when they are imported.

A leaf module (it imports nothing of sparsify's but `errors`): implementations import it to register
themselves, and `sparsify.registry` imports the implementations to fill it, so neither imports the other
both ways. Look names up through `sparsify.registry.get`, which imports every implementation first;
`lookup` is for code that has imported the implementations it needs itself (e.g. `sparsify.formats`).

``PRUNERS``: method name -> `sparsify.pruners.base.Pruner`
``FORMATS``: packed format name -> `sparsify.formats.base.Format`
``ACCUMULATORS``: statistic name -> accumulator class (``add_batch(x)``, see calibrate/stats.py)
``ALLOCATORS``: allocation name -> `sparsify.allocators.base.Allocator`
"""
from __future__ import annotations

from sparsify.errors import UserError

PRUNERS: dict = {}
FORMATS: dict = {}
ACCUMULATORS: dict = {}
ALLOCATORS: dict = {}


def lookup(table: dict, name: str, what: str):
    """``table[name]``, or a UserError listing the known names."""
    if name not in table:
        raise UserError(f"unknown {what} {name!r}: choose one of {', '.join(sorted(table))}")
    return table[name]
