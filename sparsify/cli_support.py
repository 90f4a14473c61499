"""What the CLI's commands share: error handling, output, the per-layer options of `prune` and `plan`.

Kept apart from `sparsify.cli` so that the command module stays a list of thin commands. Nothing here
imports torch or transformers at module level (`sparsify --help` must stay fast).
"""
from __future__ import annotations

import functools
import json
from typing import Optional

import typer


def fail(message: str, code: int = 2):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every ``finally`` (temp dirs) runs."""


def on_sigterm(signum, frame):
    raise Terminated()


def handles_errors(fn):
    """Turn UserError into one line + exit code 2; SIGTERM into cleanup like Ctrl-C; quiet the libraries."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import os
        import signal
        import threading

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sparsify.errors import UserError

        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            fail(str(e), e.exit_code)
        except Terminated:
            fail("terminated (SIGTERM); nothing was written", 128 + signal.SIGTERM)
        except KeyboardInterrupt:
            fail("interrupted; nothing was written", 130)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


PIPE_WIDTH = 250  # columns of tables written to a file or a pipe (Rich would cut them at 80)


def emit(result: dict, as_json: bool, render) -> None:
    """``--json``: the result as JSON; else its Rich tables, at full width when stdout is not a terminal."""
    if as_json:
        typer.echo(json.dumps(result, indent=1, default=str))
    else:
        import os

        from rich.console import Console

        console = Console()
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console = Console(width=PIPE_WIDTH)
        for item in render(result):
            console.print(item)


def parse_kv(items: list[str], flag: str) -> dict:
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
    ("method", Optional[str], typer.Option(None, help="magnitude | wanda | sparsegpt | admm | none (weights unchanged, e.g. with --attention). Default: wanda, or magnitude for a bare .safetensors.")),
    ("preset", Optional[str], typer.Option(None, help="fast (wanda) | best (the lowest measured 2:4 perplexity within 2x SparseGPT's time: sparsegpt, then 4 distillation steps at lr 5e-4): sets --method, its options and the distillation; the manifest records what it chose.")),
    ("scheme", str, typer.Option("unstructured", help="unstructured | N:M (2:4, 4:8, ...) | block:RxC (whole tiles, e.g. block:32x32; stored as bsr).")),
    ("sparsity", float, typer.Option(0.5, help="Fraction removed, in [0, 1) (unstructured; an N:M scheme fixes its own, 1 - N/M).")),
    ("per", str, typer.Option("row", help="unstructured threshold per output 'row' or per 'layer'.")),
    ("quant", str, typer.Option("none", help="none | int8 (per channel) | int4 (per group) | fp8 (e4m3, per channel) | w8a8 (int8 weights and activations).")),
    ("group_size", Optional[int], typer.Option(None, help="int4 group size along the input dim: 32, 64, 128 (default) or 0 for per channel.")),
    ("plan", Optional[str], typer.Option(None, "--plan", help="Per-layer rules (YAML/JSON: match glob -> method, scheme, sparsity, quant, group_size, skip), or an artifact to repeat its plan.")),
    ("allocation", str, typer.Option("uniform", help="Per-layer sparsity: uniform | owl (outlier-weighed, per block) | ecoflap (from loss gradients or perturbations, per block / matrix / tower) | lpvit (block schemes: per-layer tile budgets from distortion curves and a hardware cost); all but uniform need calibration.")),
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


def prune_config(layer: dict, model: str, **more):
    """A `PruneConfig` from the shared layer options plus a command's own settings."""
    from sparsify.config import PruneConfig

    method, preset = layer["method"], layer["preset"]
    if preset is not None:
        from sparsify.errors import UserError
        from sparsify.presets import resolve

        chosen = resolve(preset, {})[0]
        if method not in (None, chosen):
            raise UserError(f"--preset {preset} chooses --method {chosen}: drop --method {method} or --preset")
        method = chosen
    if method is None:
        method = "magnitude" if model.endswith(".safetensors") and not has_config(model) else "wanda"
    return PruneConfig(method=method, preset=preset, scheme=layer["scheme"], sparsity=layer["sparsity"], per=layer["per"],
                       quant=layer["quant"], group_size=layer["group_size"], targets=layer["targets"] or None,
                       ignore=layer["ignore"] or None, method_args=parse_kv(layer["method_arg"], "--method-arg"),
                       plan=layer["plan"], allocation=layer["allocation"], dtype=layer["dtype"], **more)


def allocation_args(allocation: str, items: list[str], **flags) -> dict:
    """``--allocation-arg KEY=VALUE`` items plus the ecoflap flags that were given (they only apply to ecoflap)."""
    from sparsify.errors import UserError

    args = parse_kv(items, "--allocation-arg")
    given = {k: v for k, v in flags.items() if v is not None}
    if given and allocation != "ecoflap":
        names = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UserError(f"{names} only apply to --allocation ecoflap (this run uses --allocation {allocation})")
    return {**args, **given}


ATTENTION = ("double-sparsity",)


def attention_config(attention: str | None, seed: int = 0, **ds):
    """``--attention`` and the ``--ds-*`` options -> a DoubleSparsityConfig, or None; ``--ds-*`` alone is an error."""
    from sparsify.errors import UserError

    given = {k: v for k, v in ds.items() if v is not None}
    if attention is None:
        if given:
            names = ", ".join("--ds-" + k.replace("_", "-") for k in given)
            raise UserError(f"{names} only apply with --attention double-sparsity: add it or drop them")
        return None
    if attention not in ATTENTION:
        raise UserError(f"--attention {attention!r}: use {', '.join(ATTENTION)}")
    from sparsify.attention.double_sparsity import DoubleSparsityConfig

    return DoubleSparsityConfig(seed=seed, **given)


def has_config(path: str) -> bool:
    from pathlib import Path

    return (Path(path).parent / "config.json").exists()


def device_name(name: str) -> str:
    """``auto`` -> cuda when present, else cpu; any other name must exist here (one line and exit 2 if not)."""
    import torch

    from sparsify.models.load import check_device

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return check_device(name)
