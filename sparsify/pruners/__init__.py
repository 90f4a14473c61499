"""Pruning methods, registered by name in `sparsify.tables.PRUNERS` on import."""
from sparsify.pruners import admm, magnitude, none, sparsegpt, wanda  # noqa: F401
