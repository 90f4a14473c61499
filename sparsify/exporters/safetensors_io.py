"""A streaming safetensors writer: tensors are written one at a time, in bounded memory.

`safetensors.torch.save_file` needs every tensor in memory at once. Here each tensor's bytes go
straight to a per-shard scratch file; `close()` writes each shard as
``[8-byte little-endian header length][JSON header, space-padded to 8 bytes][raw data]`` (the
safetensors layout) and, when there is more than one shard, a Hugging Face style
``model.safetensors.index.json``. Shards are cut at ``max_shard_bytes``.

`check_file` reads only that header to tell a complete file from a renamed text file or a truncated
download, so every reader (model directories, bare files, artifacts) can refuse it in one line
instead of a ``SafetensorError`` traceback.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from sparsify.errors import UserError

MAX_HEADER = 100 << 20  # bytes; the safetensors library's own limit
DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class ShardedWriter:
    """Append tensors with `add`, then `close()` to assemble the files. Returns {file name: bytes}."""

    def __init__(self, out_dir: Path, prefix: str = "model", max_shard_bytes: int = 4 << 30):
        self.out_dir, self.prefix, self.max_shard_bytes = Path(out_dir), prefix, max_shard_bytes
        self.shards: list[dict] = []
        self._new_shard()

    def _new_shard(self):
        path = self.out_dir / f".{self.prefix}-{len(self.shards)}.data"
        self.shards.append({"path": path, "fh": open(path, "wb"), "entries": {}, "size": 0})

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in DTYPE_CODES:
            raise TypeError(f"{name}: dtype {tensor.dtype} has no safetensors code")
        if any(name in s["entries"] for s in self.shards):
            raise ValueError(f"duplicate tensor name {name}")
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        shard = self.shards[-1]
        if shard["size"] and shard["size"] + len(raw) > self.max_shard_bytes:
            self._new_shard()
            shard = self.shards[-1]
        shard["fh"].write(raw)
        start = shard["size"]
        shard["size"] += len(raw)
        shard["entries"][name] = {
            "dtype": DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [start, shard["size"]],
        }

    def close(self, metadata: dict[str, str] | None = None) -> dict[str, int]:
        n = len(self.shards)
        names = [f"{self.prefix}.safetensors"] if n == 1 else [
            f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
        ]
        sizes, weight_map = {}, {}
        for name, shard in zip(names, self.shards):
            shard["fh"].close()
            header = dict(shard["entries"])
            if metadata:
                header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            with open(self.out_dir / name, "wb") as out, open(shard["path"], "rb") as data:
                out.write(struct.pack("<Q", len(blob)))
                out.write(blob)
                shutil.copyfileobj(data, out, 16 << 20)
            shard["path"].unlink()
            sizes[name] = (self.out_dir / name).stat().st_size
            weight_map.update({k: name for k in shard["entries"]})
        if n > 1:
            index = {"metadata": {"total_size": sum(s["size"] for s in self.shards)}, "weight_map": weight_map}
            (self.out_dir / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=1))
        return sizes

    def abort(self) -> None:
        for shard in self.shards:
            shard["fh"].close()
            shard["path"].unlink(missing_ok=True)


def check_file(path: str | Path) -> None:
    """UserError when ``path`` is not a whole safetensors file: its 8-byte header length, its JSON header
    and the data offsets of every tensor must fit inside the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        why = None if 0 < n <= min(size - 8, MAX_HEADER) else "no safetensors header"
        if why is None:
            try:
                header = json.loads(fh.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError):
                why = "its header is not valid safetensors JSON"
            else:
                if 8 + n + end > size:
                    why = f"truncated: {size:,} bytes, its header needs {8 + n + end:,}"
    if why:
        raise UserError(f"{path} is not a valid .safetensors file ({why}): re-download or re-create it")


def read_tensors(directory: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    """Load every tensor of a (possibly sharded) safetensors set; never unpickles."""
    from safetensors.torch import load_file

    directory = Path(directory)
    index = directory / f"{prefix}.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        f"{prefix}.safetensors"
    ]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        check_file(directory / f)
        out.update(load_file(str(directory / f)))
    return out
