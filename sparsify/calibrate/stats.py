"""Per-layer statistics accumulators: ``add_batch(x)`` with x (tokens, in), then read the result.

Placeholder written by the lead; the pruners helper fills it in (ColumnNorm, Hessian).
"""
