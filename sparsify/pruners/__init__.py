"""Pruning methods, registered by name in `sparsify.registry.PRUNERS` on import."""
from sparsify.pruners import magnitude, sparsegpt, wanda  # noqa: F401
