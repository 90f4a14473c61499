"""sparsify: post-training pruning, quantization and packing of transformer checkpoints.

Public API (imports are lazy so that `sparsify --help` stays fast):
    prune(model, PruneConfig(...), out)   -> manifest dict, writes an artifact directory
    load(artifact)                        -> (LoadedModel, manifest)
    evaluate(model_or_artifact, ...)      -> result dict
"""
from sparsify.version import __version__

__all__ = ["prune", "load", "evaluate", "PruneConfig", "CalibConfig", "Scheme", "UserError", "__version__"]


def __getattr__(name):
    if name == "prune":
        from sparsify.pipeline import prune

        return prune
    if name == "load":
        from sparsify.runtime.load import load_artifact

        return load_artifact
    if name == "evaluate":
        from sparsify.eval.run import evaluate

        return evaluate
    if name in ("PruneConfig", "CalibConfig", "Scheme"):
        from sparsify import config

        return getattr(config, name)
    if name == "UserError":
        from sparsify.errors import UserError

        return UserError
    raise AttributeError(name)
