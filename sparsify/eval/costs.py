"""Measured latency of block-sparse layers as a function of kept tiles: LPViT's ``cost=measured`` model.

`sparsify bench ARTIFACT --save-costs FILE` times, on the device it runs on, one packed linear of
every block-sparse layer shape (and tile size) of the artifact, through the same dispatch the runtime
uses (so the timings include its switch to the dense weight where the sparse kernel loses), at a few
kept-tile fractions from 0 to 1 with random tiles kept, for ``tokens`` activation rows. The file:

    {"kind": "sparsify-latency", "device": ..., "threads": ..., "tokens": T,
     "layers": [{"shape": [out, in], "block": [R, C], "kept": [f0, ...], "ms": [...], "kernel": [...]}]}

`latency_curve` turns one entry into the cost of a layer's surviving tiles for every count of removed
tiles: linear between the measured fractions, made non-decreasing in the kept count (a timing that
dips as more tiles are kept is noise, and the solver needs a monotone cost).
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from sparsify.errors import UserError

KEPT = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
KIND = "sparsify-latency"


def _random_bsr(shape, block, kept: float, seed: int):
    """A packed float32 ``bsr`` weight of ``shape`` with round(kept x tiles) random tiles kept."""
    from sparsify import formats

    (out, inp), (r, c) = shape, block
    g = torch.Generator().manual_seed(seed)
    br, bc = -(-out // r), -(-inp // c)
    keep = torch.zeros(br * bc, dtype=torch.bool)
    keep[torch.randperm(br * bc, generator=g)[:round(kept * br * bc)]] = True
    mask = keep.view(br, bc).repeat_interleave(r, 0).repeat_interleave(c, 1)[:out, :inp]  # (out, in)
    return formats.pack("bsr", torch.where(mask, torch.randn(out, inp, generator=g), 0.0), block=(r, c))


def measure(shapes: list[tuple], tokens: int, timeit, device: str = "cpu", reps: int = 7) -> dict:
    """Time the dispatch on each (shape, block) at every fraction of `KEPT` with ``timeit(fn, device,
    reps=reps)`` (seconds, `sparsify.eval.latency.timeit`); returns the file's dict."""
    from sparsify import kernels
    from sparsify.tensors import to_device

    layers = []
    for n, (shape, block) in enumerate(shapes):
        x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(n)).to(device)  # (tokens, in)
        ms, names = [], []
        for i, kept in enumerate(KEPT):
            tensors, attrs = _random_bsr(shape, block, kept, seed=1000 * n + i)
            tensors = to_device(tensors, device)
            ms.append(timeit(lambda: kernels.linear(x, "bsr", tensors, attrs), device, reps=reps) * 1e3)
            names.append(kernels.kernel_name(x, "bsr", attrs, tensors))
        layers.append({"shape": list(shape), "block": list(block), "kept": list(KEPT), "ms": ms, "kernel": names})
    return {"kind": KIND, "device": device, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "tokens": tokens, "layers": layers}


def save(table: dict, path: str | Path) -> Path:
    """Write the latency file whole or not at all (a temporary beside it, then a rename)."""
    import os
    import tempfile

    path = Path(path)
    if path.name == "sparsify.json" or path.suffix == ".safetensors":
        raise UserError(f"--save-costs {path}: refusing to write over an artifact's file: choose another name")
    if not path.resolve().parent.is_dir():
        raise UserError(f"--save-costs {path}: its directory does not exist: create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(table, indent=1))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(path: str | Path) -> dict:
    """A latency file written by `save`; anything else is a one-line error naming the fix."""
    fix = "write one with: sparsify bench ARTIFACT --save-costs FILE (an artifact pruned with --scheme block:RxC)"
    try:
        table = json.loads(Path(path).read_text())
        ok = table.get("kind") == KIND and all(len(e["kept"]) == len(e["ms"]) >= 2 for e in table["layers"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise UserError(f"lpvit costs={path}: not a latency file from sparsify bench; {fix}")
    return table


def latency_curve(table: dict, shape, block, tiles: int) -> torch.Tensor:
    """(tiles + 1,) float64 measured ms of the surviving tiles with k = 0..tiles tiles removed."""
    entry = next((e for e in table["layers"] if e["shape"] == list(shape) and e["block"] == list(block)), None)
    if entry is None:
        have = sorted({f"{e['shape'][0]}x{e['shape'][1]} in {e['block'][0]}x{e['block'][1]} tiles"
                       for e in table["layers"]})
        raise UserError(f"lpvit cost=measured: no timing for a {shape[0]}x{shape[1]} layer in {block[0]}x{block[1]} "
                        f"tiles (the file has {', '.join(have)}): run sparsify bench --save-costs on an artifact "
                        "with this layer and scheme")
    kept = torch.tensor(entry["kept"], dtype=torch.float64)
    order = kept.argsort()
    kept, ms = kept[order], torch.tensor(entry["ms"], dtype=torch.float64)[order].cummax(0).values
    frac = 1 - torch.arange(tiles + 1, dtype=torch.float64) / tiles  # kept fraction per count removed
    idx = torch.searchsorted(kept, frac.clamp(kept[0], kept[-1])).clamp(1, len(kept) - 1)
    lo, hi = kept[idx - 1], kept[idx]
    w = ((frac.clamp(kept[0], kept[-1]) - lo) / (hi - lo).clamp_min(1e-12))
    return ms[idx - 1] + w * (ms[idx] - ms[idx - 1])  # (tiles + 1,)
