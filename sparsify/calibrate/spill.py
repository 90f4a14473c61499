"""Calibration activations on disk (``--activations disk``): one block's inputs and outputs, one file
per batch, so that only the batch being forwarded is in memory.

The runner keeps a block's hidden states in a list-like store: ``append`` a batch, iterate over the
batches in order, ``clear`` once the next block's inputs exist. A Python list is the in-memory store;
`DiskActivations` is the same protocol over safetensors files (dtype and shape in the header, read
back bit for bit), under a directory that `spill_dir` removes at the end, error or not.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch


class DiskActivations:
    """A list of tensors kept as ``{index}.safetensors`` files in a fresh directory under ``root``.

    Iterating reads one file at a time; nothing stays in memory between items.
    """

    def __init__(self, root: str | Path):
        self.dir = Path(tempfile.mkdtemp(prefix="block-", dir=root))
        self.count = 0
        self.nbytes = 0

    def append(self, x: torch.Tensor) -> None:
        from safetensors.torch import save_file

        x = x.detach().to("cpu").contiguous()
        save_file({"x": x}, str(self.dir / f"{self.count}.safetensors"))
        self.count += 1
        self.nbytes += x.numel() * x.element_size()

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        from safetensors.torch import load_file

        for j in range(self.count):
            yield load_file(str(self.dir / f"{j}.safetensors"))["x"]

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.count = self.nbytes = 0


@contextmanager
def spill_dir(near: str | Path):
    """A hidden scratch directory beside ``near`` (the output: on the disk the user chose, not a
    tmpfs that would hold it in memory again), removed on exit. Yields its path."""
    parent = Path(near).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f".{Path(near).name}.activations-", dir=parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def store_factory(root: str | os.PathLike | None):
    """A function making an empty store: a list, or `DiskActivations` under ``root`` when given."""
    if root is None:
        return list
    return lambda: DiskActivations(root)
