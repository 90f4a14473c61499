"""Shared helpers for the CLI end-to-end tests: run the CLI in-process and check artifacts."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from sparsify.cli import app

SMALL_CALIB = ["--samples", "4", "--seq-len", "32", "--batch-size", "2"]


def cli(*args: str, code: int = 0):
    """Invoke `sparsify ARGS`; assert the exit code; return the result (stdout / stderr separate)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code} != {code}\nstdout: {result.stdout}\n" \
                                     f"stderr: {result.stderr}\nexc: {result.exception!r}"
    return result


def cli_json(*args: str) -> dict:
    return json.loads(cli(*args, "--json").stdout)


def nm_ok(weight: torch.Tensor, n: int, m: int) -> bool:
    """Independent check: every group of m consecutive inputs has at most n non-zeros."""
    groups = (weight != 0).reshape(weight.shape[0], -1, m)  # (out, G, m)
    return bool((groups.sum(-1) <= n).all())


def dense_weights(artifact: Path) -> dict[str, torch.Tensor]:
    """Every compressed Linear of a loaded artifact as a dense weight, by module name."""
    import sparsify
    from sparsify.runtime.sparse_linear import SparseLinear

    model = sparsify.load(artifact)[0].model
    return {name: m.dense_weight() for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))
