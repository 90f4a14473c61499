"""Data-parallel calibration on torch.distributed, for runs launched by torchrun.

Under ``torchrun --nproc-per-node N -m sparsify prune ...`` (environment variables RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) every process loads the model and runs the block-by-block runner
on its own share of the calibration batches (`shard`: every N-th batch). After each block's statistics
pass, every accumulator is all-reduced once (`reduce_stats`, through the accumulator's own
``reduce(all_reduce)``), so each process holds the statistics of all the windows and solves the same
pruning; each then feeds its own windows through the pruned block to the next one. Rank 0 alone
writes the artifact. The backend is gloo on CPU; on CUDA it is ``cpu:gloo,cuda:nccl`` (statistics on
the GPU travel over NCCL, the small flags below over gloo), one GPU per process (its LOCAL_RANK).

A step that may fail on some processes only (one rank's windows overflow, rank 0 alone checks and
writes the output) runs inside `agreed()`: one collective afterwards tells every process whether any
failed, and all of them raise there, so none waits forever in a collective the failed one never joins.
Everything outside such steps is the same on every process (same model, same plan, same reduced
statistics), so it fails everywhere alike. With one process every function here is a no-op.
"""
from __future__ import annotations

import os
import zlib
from contextlib import contextmanager
from datetime import timedelta

import torch

from sparsify.errors import UserError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets
TIMEOUT = timedelta(hours=2)  # the others wait in the last collective while rank 0 hashes, packs and writes
SINGLE = "is not supported with torchrun: run it in one process (sparsify prune / python -m sparsify prune)"


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return all(k in os.environ for k in ENV) and int(os.environ["WORLD_SIZE"]) > 1


def _dist():
    """torch.distributed when a process group is up, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def is_main() -> bool:
    return rank() == 0


def check_supported(config) -> None:
    """Refuse, before any process group exists, what cannot run data-parallel (one line naming the fix)."""
    if not (launched() or world() > 1):
        return
    if config.distill_steps:
        from sparsify.presets import preset_hint

        raise UserError(f"--distill-steps {SINGLE}{preset_hint(config.preset)}")
    if config.allocation in ("ecoflap", "lpvit"):  # they score on every window with their own passes
        raise UserError(f"--allocation {config.allocation} {SINGLE}, or write its plan there with --save-allocation "
                        "FILE and pass --plan FILE under torchrun")
    if config.device.startswith("cuda") and launched():
        local, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if config.device != "cuda":
            raise UserError(f"--device {config.device} under torchrun: pass --device cuda, each process takes "
                            "the GPU of its LOCAL_RANK")
        if local >= gpus:
            raise UserError(f"process {local} of this machine needs GPU {local}, it has {gpus}: pass "
                            f"--nproc-per-node {gpus} or fewer")


@contextmanager
def session(device: str):
    """The whole of one run: under torchrun, start the process group (unless the caller did), silence
    the progress bars of all but rank 0, agree on failure at the end (so every process exits with the
    same code) and stop the group it started. Outside torchrun it does nothing."""
    from sparsify import progress

    started = launched() and _dist() is None
    if started:
        import torch.distributed as dist

        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
    bars = progress.is_enabled()
    try:
        if not is_main():
            progress.set_enabled(False)
        with agreed():
            yield
    finally:
        progress.set_enabled(bars)
        if started:
            _dist().destroy_process_group()


@contextmanager
def agreed():
    """A step that may fail on some processes only; after it, every process raises if any one failed
    (the failed one its own error, the others a UserError with its exit code that names it)."""
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, after the others have heard of it
        error = e
    if world() > 1:
        codes = torch.zeros(world(), dtype=torch.int64)  # (world,) each process's exit code, 0: went well
        codes[rank()] = 0 if error is None else getattr(error, "exit_code", 1) or 1
        all_reduce(codes)
        failed = codes.nonzero().flatten().tolist()
        if failed and error is None:
            error = UserError(f"stopped: process {failed[0]} of {world()} failed (see its own error line)")
            error.exit_code = int(codes.max())
    if error is not None:
        raise error


def main_first(fn, *args, **kwargs):
    """``fn`` on rank 0, then on the others: e.g. a built-in model converted into the cache once, not N times."""
    result = None
    with agreed():
        if is_main():
            result = fn(*args, **kwargs)
    with agreed():
        if not is_main():
            result = fn(*args, **kwargs)
    return result


def shard(batches: list) -> list:
    """This process's share of the calibration batches: every N-th one, from its rank on."""
    n = world()
    if n == 1 or not batches:
        return batches
    if len(batches) < n:
        raise UserError(f"{n} processes need {n} calibration batches or more, this run has {len(batches)}: raise "
                        "--samples or lower --batch-size")
    return batches[rank()::n]


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` reduced in place over every process by ``op`` (sum | min | max); returns it."""
    import torch.distributed as dist

    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return tensor


def _flatten(obj, label: str, out: dict, seen: set) -> None:
    """{label: accumulator} of every distinct object with ``reduce`` inside nested dicts (None skipped)."""
    if obj is None:
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{label}/{key}", out, seen)
    elif not hasattr(obj, "reduce"):
        raise TypeError(f"{label}: {type(obj).__name__} has no reduce(), so it cannot be combined across processes")
    elif id(obj) not in seen:  # layers that share one accumulator (q/k/v) reduce it once
        seen.add(id(obj))
        out[label] = obj


def _layout(acc) -> tuple:
    """Class and tensor shapes of an accumulator (None for a tensor it has not allocated yet)."""
    return type(acc).__name__, sorted((k, None if v is None else tuple(v.shape)) for k, v in vars(acc).items()
                                      if v is None or torch.is_tensor(v))


def reduce_stats(stats: dict) -> None:
    """All-reduce a block's statistics (nested dicts of accumulators) once each, in the order given.

    The processes must hold the same accumulators: a checksum of their names and shapes is compared
    first, so that a layer reached by some processes' windows only stops the run instead of summing
    unlike tensors. Each accumulator then combines itself: ``acc.reduce(all_reduce)``.
    """
    flat: dict[str, object] = {}
    _flatten(stats, "", flat, set())  # before the early return: an accumulator without reduce fails in one process too
    if world() == 1:
        return
    crc = zlib.crc32(repr([(k, _layout(v)) for k, v in flat.items()]).encode())
    check = all_reduce(torch.tensor([crc, -crc], dtype=torch.int64), "max")  # (2,) max and -min
    if int(check[0]) != -int(check[1]):
        raise UserError("the processes collected different statistics for a block (a layer that only some "
                        f"calibration windows reach) {SINGLE}")
    with torch.inference_mode():  # the accumulators' tensors were made in the runner's inference mode
        for acc in flat.values():
            acc.reduce(all_reduce)
