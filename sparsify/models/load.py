"""Resolve a model argument (directory, .safetensors file, alias) and load it with transformers.

Only safetensors are ever read (``use_safetensors=True``); pickle checkpoints are refused with the
fix. ``trust_remote_code`` is off unless the user passes it.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparsify.config import DTYPES
from sparsify.errors import UserError
from sparsify.exporters.safetensors_io import check_file
from sparsify.models.family import Family, family_of

_PICKLE = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass
class ModelSource:
    path: Path
    kind: str  # "hf-dir" | "safetensors-file"
    config_dir: Path | None
    weight_files: list[Path] = field(default_factory=list)
    alias: str | None = None


def _weights_in(d: Path) -> list[Path]:
    """The safetensors files of a model directory: the shards its index names, else every *.safetensors;
    each checked to be a whole safetensors file (header only)."""
    index = d / "model.safetensors.index.json"
    if index.exists():
        shards = [d / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        missing = [p.name for p in shards if not p.exists()]
        if missing:
            raise UserError(f"{index} names missing shard {missing[0]}: copy all {len(shards)} shards beside it")
    else:
        shards = sorted(d.glob("*.safetensors"))
    for shard in shards:
        check_file(shard)
    return shards


def resolve(arg: str, cache_dir: str | None = None) -> ModelSource:
    """Turn a model argument into a `ModelSource`.

    Accepts a built-in alias (its Hugging Face directory, converted into the cache on first use), a
    directory with config.json and safetensors weights (sharded or not), or a ``.safetensors`` file:
    with a config.json beside it its directory is the model, else it is a bare file (config_dir None).
    Pickle checkpoints are refused, never opened.
    """
    from sparsify.models.aliases import ALIASES, resolve_alias

    arg = str(arg)
    if arg in ALIASES:
        d = resolve_alias(arg, cache_dir)
        return ModelSource(d, "hf-dir", d, _weights_in(d), alias=arg)
    path = Path(arg).expanduser().absolute()  # recorded in manifests: must name the model from anywhere
    if not path.exists():
        hint = f" (built-in aliases: {', '.join(ALIASES)})" if "/" not in arg and "." not in arg else ""
        raise UserError(f"{arg} does not exist: pass a model directory, a .safetensors file or an alias{hint}")
    if path.is_file():
        if path.suffix in _PICKLE:
            raise UserError(f"{path.name} is a pickle checkpoint, which sparsify never loads: convert it to "
                            "safetensors (e.g. save_pretrained(..., safe_serialization=True))")
        if path.suffix != ".safetensors":
            raise UserError(f"{path.name}: pass a .safetensors file or a model directory")
        if (path.parent / "config.json").exists():
            return ModelSource(path.parent, "hf-dir", path.parent, _weights_in(path.parent))
        check_file(path)
        return ModelSource(path, "safetensors-file", None, [path])
    if not (path / "config.json").exists():
        raise UserError(f"{path} has no config.json: pass a Hugging Face model directory or a .safetensors file")
    weights = _weights_in(path)
    if not weights:
        pickles = [p.name for p in path.iterdir() if p.suffix in _PICKLE]
        fix = "convert it to safetensors" if pickles else "add model.safetensors"
        raise UserError(f"{path} has no .safetensors weights{' (only ' + pickles[0] + ')' if pickles else ''}: {fix}")
    return ModelSource(path, "hf-dir", path, weights)


def sha256_files(source: ModelSource) -> dict[str, str]:
    """Streaming sha256 of each weight file and the config."""
    files = list(source.weight_files)
    if source.config_dir is not None and (source.config_dir / "config.json").exists():
        files.append(source.config_dir / "config.json")
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out[f.name] = h.hexdigest()
    return out


@dataclass
class LoadedModel:
    model: torch.nn.Module
    family: Family
    config: object
    tokenizer: object | None
    image_size: int | None
    image_mean: list[float] | None
    image_std: list[float] | None
    source: ModelSource
    dtype: torch.dtype


def preprocessing(path: Path, family: Family, config, trust_remote_code: bool = False):
    """(tokenizer, image size, mean, std) for a model directory; None where the family has no such input.

    Image settings come from preprocessor_config.json (crop size, else size) when present, else from
    the config's image_size with mean = std = 0.5.
    """
    tokenizer = size = mean = std = None
    if "text" in family.inputs:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise UserError(f"{path} has no loadable tokenizer ({str(e).splitlines()[0][:120]}): "
                            "save the tokenizer files beside config.json") from None
    if "image" in family.inputs:
        vision = getattr(config, "vision_config", None) or config
        size, mean, std = vision.image_size, [0.5] * 3, [0.5] * 3
        proc = Path(path) / "preprocessor_config.json"
        if proc.exists():
            p = json.loads(proc.read_text())
            mean, std = p.get("image_mean", mean), p.get("image_std", std)
            crop = p.get("crop_size") or p.get("size") or size
            size = crop.get("height", crop.get("shortest_edge", size)) if isinstance(crop, dict) else crop
    return tokenizer, size, mean, std


def check_device(device: str) -> str:
    """``device`` itself when this machine has it (cpu, cuda, cuda:N); else UserError naming the fix.
    Every command that computes goes through it, so ``--device cuda`` never silently runs on the CPU."""
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise UserError(f"--device {device!r}: use cpu, cuda, cuda:N or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here: use --device cpu (or auto)")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _checkpoint_dtype(config) -> torch.dtype:
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return name if isinstance(name, torch.dtype) else getattr(torch, str(name), torch.float32)


def load_model(source: ModelSource, dtype: str | None = None, device: str = "cpu",
               trust_remote_code: bool = False, meta: bool = False) -> LoadedModel:
    """Load a resolved model with its own architecture class (else its family's auto class), in eval mode, quietly.

    Args:
        dtype: "float32" | "float16" | "bfloat16"; None keeps the checkpoint's own (config dtype, else float32).
        trust_remote_code: passed through to transformers; off by default (it runs code from the directory).
        meta: build the model with its parameters on the meta device and read no weights (streaming:
            `sparsify.models.stream.StreamedWeights` brings them in part by part); ``device`` is not applied.
    Returns:
        A `LoadedModel` with the tokenizer (text families) and image size/mean/std (image families).
    """
    import transformers
    from transformers import AutoConfig
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if source.config_dir is None:
        raise UserError(f"{source.path.name} is a bare .safetensors file with no config.json beside it: "
                        "pass the model directory to load it")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    check_device(device)
    config = AutoConfig.from_pretrained(source.config_dir, trust_remote_code=trust_remote_code)
    family = family_of(config)
    torch_dtype = getattr(torch, dtype) if dtype else _checkpoint_dtype(config)
    if meta:
        from sparsify.runtime.meta import build_on_meta

        model = build_on_meta(config, family.auto_class, torch_dtype, trust_remote_code).eval()
    else:
        cls = getattr(transformers, family.auto_class)
        model = cls.from_pretrained(source.config_dir, dtype=torch_dtype, use_safetensors=True,
                                    trust_remote_code=trust_remote_code)
        model.eval().to(device)
    tokenizer, size, mean, std = preprocessing(source.config_dir, family, config, trust_remote_code)
    return LoadedModel(model, family, config, tokenizer, size, mean, std, source, torch_dtype)
