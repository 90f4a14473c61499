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


def bare_copy(model_dir: Path, tmp_path: Path) -> Path:
    """The weights of ``model_dir`` alone, as a bare ``.safetensors`` file without config.json."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "in" / "weights.safetensors"
    path.parent.mkdir()
    save_file(load_file(model_dir / "model.safetensors"), path)
    return path


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _source_weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def check_plan_applied(artifact, source, skipped_prefixes: tuple[str, ...], mlp_sparsity: float) -> None:
    """Attention 2:4, MLP ``mlp_sparsity`` per row, skipped blocks bit-identical to the source: from the weights."""
    import sparsify

    dense, src = dense_weights(artifact), _source_weights(source)
    loaded = sparsify.load(artifact)[0].model.state_dict()
    for name, w in dense.items():
        assert not name.startswith(skipped_prefixes), name
        zeros = (w == 0).sum(1)  # (out,) per row; ">=" since a source weight may itself be 0 (e.g. from a 4-bit grid)
        if ".mlp." in name:
            assert torch.all(zeros >= int(w.shape[1] * mlp_sparsity)), name
            assert zeros.float().mean() < int(w.shape[1] * mlp_sparsity) + 0.05 * w.shape[1], name  # not 2:4 (50%)
        else:
            assert nm_ok(w, 2, 4) and torch.all(zeros >= w.shape[1] // 2), name
    expected = {k.removesuffix(".weight") for k in src if k.endswith("proj.weight") and not k.startswith(skipped_prefixes)}
    assert set(dense) == expected  # every layer of the other blocks compressed, no more
    skipped = [k for k in src if k.startswith(skipped_prefixes) and k.endswith("proj.weight")]
    assert skipped
    for k in skipped:
        assert torch.equal(loaded[k], src[k]), k
