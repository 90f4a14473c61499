"""The package version, in a module of its own so that any module can import it without importing
the `sparsify` package facade (whose lazy API functions import the pipeline: an import cycle)."""
__version__ = "0.1.0"
