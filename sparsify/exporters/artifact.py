"""The artifact directory: packed tensors + manifest + the source's config/tokenizer files.

Written into a hidden temporary directory beside the output and renamed into place only when
complete (`sparsify.atomic.atomic_dir`), so an artifact is either whole or absent. Never written
over the input.

Layout:
  model.safetensors (or shards + index)  untouched tensors by name; packed ones as {module}.{key}
  sparsify.json                          the manifest (see `MANIFEST_NAME`, schema in README)
  config.json, tokenizer files, ...      copied unchanged from the source
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from sparsify.atomic import atomic_dir
from sparsify.errors import UserError
from sparsify.exporters.safetensors_io import ShardedWriter

MANIFEST_NAME = "sparsify.json"
FORMAT_VERSION = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


def check_output(out: str | Path, inputs: list[Path], overwrite: bool) -> Path:
    """Validate the output path before any work starts (so errors leave nothing behind)."""
    out = Path(out).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if src.is_relative_to(out) or (src.is_file() and out == src.parent):  # out is, or holds, the input
            raise UserError(f"output {out} would overwrite the input {src}: choose another -o directory")
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists: choose another -o directory or pass --overwrite")
    if out.exists() and not (out / MANIFEST_NAME).exists() and any(out.iterdir()):
        raise UserError(f"output {out} exists and is not a sparsify artifact: refusing to replace it; choose another -o")
    if not out.parent.exists():
        raise UserError(f"parent directory {out.parent} does not exist: create it first")
    return out


def copy_side_files(src_dir: Path | None, dst: Path) -> list[str]:
    """Copy config, generation config, tokenizer and processor files (everything but weights)."""
    copied = []
    if src_dir is None:
        return copied
    for f in sorted(Path(src_dir).iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.endswith(".index.json") \
                and not f.name.startswith(".") and f.name != MANIFEST_NAME and f.stat().st_size < (64 << 20):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


class ArtifactWriter:
    """Context manager: ``with ArtifactWriter(out, overwrite) as w: w.tensors.add(...); w.manifest = {...}``."""

    def __init__(self, out: Path, overwrite: bool = False, max_shard_bytes: int = 4 << 30):
        self.out, self.overwrite, self.max_shard_bytes = Path(out), overwrite, max_shard_bytes
        self.manifest: dict = {}

    def __enter__(self) -> ArtifactWriter:
        self._atomic = atomic_dir(self.out, overwrite=self.overwrite)
        self.tmp = self._atomic.__enter__()
        self.tensors = ShardedWriter(self.tmp, max_shard_bytes=self.max_shard_bytes)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.tensors.abort()
        else:
            try:
                self.manifest["files"] = self.tensors.close(metadata={"format": "pt", "producer": "sparsify"})
                self.manifest.setdefault("format_version", FORMAT_VERSION)
                (self.tmp / MANIFEST_NAME).write_text(json.dumps(self.manifest, indent=1))
            except BaseException as e:
                self._atomic.__exit__(type(e), e, e.__traceback__)  # removes the temporary directory
                raise
        return self._atomic.__exit__(exc_type, exc, tb)  # renames into place, or removes on error


def read_manifest(path: str | Path) -> dict:
    """Read and validate an artifact's manifest; UserError when it is not an artifact."""
    path = Path(path)
    mf = path / MANIFEST_NAME
    if not mf.exists():
        raise UserError(f"{path} is not a sparsify artifact (no {MANIFEST_NAME}): pass a directory written by 'sparsify prune'")
    try:
        manifest = json.loads(mf.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{mf} is not valid JSON ({e}): re-run 'sparsify prune' to write the artifact again") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{mf} is not a sparsify manifest (not a JSON object): re-run 'sparsify prune'")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer sparsify (format {manifest['format_version']}): upgrade sparsify")
    return manifest
