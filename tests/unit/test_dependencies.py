"""The README's main install (``pip install torch==2.13.0 -e .``) makes every headline command work.

Every third-party module that ``sparsify/`` imports (read with `ast`, at module level and inside
functions) must belong to a distribution named in ``[project] dependencies`` of pyproject.toml,
except the ones in `OPTIONAL`, which name the extra that brings them and whose features check for
them before doing any work. The mapping import name -> distribution (``PIL`` -> pillow, ``yaml`` ->
pyyaml) comes from the installed metadata, so the test needs the dev environment, which has them all.
And the friendly checks: ONNX export without its stack, and ``eval --report`` without matplotlib,
fail with one line before loading anything.
"""
from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# import name -> why it may be missing (none today: the ONNX stack and matplotlib are main dependencies)
OPTIONAL: dict[str, str] = {}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_norm(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]) for req in project["dependencies"]}


def third_party_imports() -> dict[str, list[str]]:
    """top-level import name -> files that import it, for every non-stdlib, non-sparsify import."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "sparsify").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "sparsify" and top not in sys.stdlib_module_names:
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_import_is_a_declared_dependency():
    deps, dists = declared(), packages_distributions()
    missing = []
    for top, files in sorted(third_party_imports().items()):
        if top in OPTIONAL:
            continue
        owners = {_norm(d) for d in dists.get(top, [top])}
        if not owners & deps:
            missing.append(f"{top} (distribution {', '.join(sorted(owners))}; imported by {files[0]})")
    assert not missing, "imported but not in [project] dependencies:\n" + "\n".join(missing)
    assert "torch" in deps and "onnxruntime" in deps and "matplotlib" in deps


def test_torch_pin_stays_loose():
    """CI installs ``torch==2.13.0 -e .``: a stricter pin here would make pip fetch another (CUDA) build."""
    tomllib = pytest.importorskip("tomllib")
    torch_req = [r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                 if _norm(r).startswith("torch")]
    assert torch_req == ["torch>=2.4"]


def cli(*args, code: int):
    from typer.testing import CliRunner

    from sparsify.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def test_onnx_export_checks_its_stack_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # `import ml_dtypes` now raises ImportError
    monkeypatch.setitem(sys.modules, "sparsify.exporters.onnx_quant", None)  # as if never imported
    monkeypatch.setattr("sparsify.runtime.load.load_artifact", _no_work)
    art = tmp_path / "art"
    art.mkdir()
    (art / "sparsify.json").write_text('{"format_version": 1, "tensors": {}}')
    err = cli("export", art, "--onnx", code=2).stderr.strip()
    assert err.startswith("error: ONNX export needs ml_dtypes") and "pip install" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_eval_report_checks_matplotlib_before_evaluating(tmp_path, monkeypatch):
    monkeypatch.setattr("sparsify.eval.run.evaluate", _no_work)
    with monkeypatch.context() as m:  # restores the real module (an earlier test may have imported its submodules)
        m.setitem(sys.modules, "matplotlib", None)
        err = cli("eval", tmp_path, "--report", tmp_path / "report", code=2).stderr.strip()
    assert "--report needs matplotlib" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "report").exists()
    (tmp_path / "file").write_text("x")
    assert "is a file" in cli("eval", tmp_path, "--report", tmp_path / "file", code=2).stderr


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the dependency check")
