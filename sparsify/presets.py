"""Named method choices: ``--preset fast`` and ``--preset best``, each one flag for a measured winner.

A preset fills in the method and its options, and the distillation after pruning (``distill_steps``,
``distill_lr``); whatever the user sets explicitly (``method_args`` keys, ``--distill-steps``,
``--distill-lr``) wins over the preset's. The manifest records the preset's name next to the concrete method and
options it chose (`sparsify.config.PruneConfig` keeps both), so a run can be repeated without it.
Why each is what it is: the README's quality table (bench/quality.py --suite best, SmolLM2 2:4).
"""
from __future__ import annotations

from sparsify.errors import UserError

PRESETS: dict[str, dict] = {
    "fast": {"method": "wanda", "method_args": {}},  # the quickest calibrated method: one pass, no solve
    # the lowest 2:4 perplexity measured within twice SparseGPT's time (see module docstring): SparseGPT, then 4
    # end-to-end distillation steps against the dense model (16 calibration sequences, mask frozen) at a
    # learning rate that moves in 4 steps. ADMM instead of SparseGPT was better still and took 2.1x.
    "best": {"method": "sparsegpt", "method_args": {}, "distill_steps": 4, "distill_lr": 5e-4},
}
DISTILL_DEFAULTS = {"distill_steps": 0, "distill_lr": 1e-4}  # without a preset (or a preset that leaves them)


def distill_settings(name: str | None, **given) -> dict:
    """``distill_steps`` / ``distill_lr``: the given value where not None, else the preset's, else the default."""
    chosen = PRESETS.get(name, {}) if name else {}
    return {k: given[k] if given.get(k) is not None else chosen.get(k, d) for k, d in DISTILL_DEFAULTS.items()}


def preset_hint(name: str | None) -> str:
    """For errors about distillation that a preset, not the user, turned on: how to turn it off."""
    return f" (--preset {name} distills: add --distill-steps 0)" if name and PRESETS.get(name, {}).get("distill_steps") else ""


def resolve(name: str, method_args: dict) -> tuple[str, dict]:
    """(method, method_args) for preset ``name``, the user's ``method_args`` over the preset's."""
    if name not in PRESETS:
        raise UserError(f"--preset {name!r}: use one of {', '.join(PRESETS)}")
    chosen = PRESETS[name]
    return chosen["method"], {**chosen["method_args"], **method_args}
