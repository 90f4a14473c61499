"""Named method choices: ``--preset fast`` and ``--preset best``, each one flag for a measured winner.

A preset fills in the method and its options; whatever the user sets explicitly in ``method_args``
wins over the preset's. The manifest records the preset's name next to the concrete method and
options it chose (`sparsify.config.PruneConfig` keeps both), so a run can be repeated without it.
Why each is what it is: the README's quality table (bench/quality.py, SmolLM2 2:4).
"""
from __future__ import annotations

from sparsify.errors import UserError

PRESETS: dict[str, dict] = {
    "fast": {"method": "wanda", "method_args": {}},  # the quickest calibrated method: one pass, no solve
    "best": {"method": "admm", "method_args": {}},  # lowest 2:4 perplexity measured (see module docstring)
}


def resolve(name: str, method_args: dict) -> tuple[str, dict]:
    """(method, method_args) for preset ``name``, the user's ``method_args`` over the preset's."""
    if name not in PRESETS:
        raise UserError(f"--preset {name!r}: use one of {', '.join(PRESETS)}")
    chosen = PRESETS[name]
    return chosen["method"], {**chosen["method_args"], **method_args}
