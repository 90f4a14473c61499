"""One rank of `tests/unit/test_distributed.py`, launched by ``torchrun --nproc-per-node 2 THIS OUT``,
and `start` / `finish`, the launcher the torchrun tests share.

Each rank accumulates its share (`distributed.shard`) of seeded random windows into a ColumnNorm, a
Hessian and a QKStats, reduces them (`distributed.reduce_stats`, the ColumnNorm filed under two
names as q/k/v share one), and saves what it holds to OUT/rank{r}.pt; then it records what
`agreed()` raised when rank 1 alone failed, and what `shard` raised with fewer batches than ranks.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sparsify.calibrate import distributed
from sparsify.calibrate.observers import QKStats
from sparsify.calibrate.stats import ColumnNorm, Hessian
from sparsify.errors import UserError

IN, HEADS, KV, T, D, BATCHES = 12, 4, 2, 5, 8, 5  # 5 batches: rank 0 takes 3, rank 1 2 (unequal weights)


def start(args: list, cwd: Path) -> subprocess.Popen:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` (a free port; one thread per rank) in its own session."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[str, str]:
    """(stdout, stderr) of a `start`ed run; past ``timeout`` its whole process group is killed (no stray ranks)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise


def windows(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``BATCHES`` batches of inputs x (2, T, IN), queries (2, HEADS, T, D) and keys (2, KV, T, D)."""
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(2, T, IN, generator=g) * (1 + i), "q": torch.randn(2, HEADS, T, D, generator=g),
             "k": torch.randn(2, KV, T, D, generator=g) * 3} for i in range(BATCHES)]


def accumulate(batches: list[dict]) -> dict:
    """The three accumulators over ``batches``, in order."""
    norm, hessian, qk = ColumnNorm(IN), Hessian(IN), QKStats()
    for b in batches:
        norm.add_batch(b["x"])
        hessian.add_batch(b["x"])
        qk.add(b["q"], b["k"])
    return {"norm": norm, "hessian": hessian, "qk": qk}


def state(acc: dict) -> dict[str, torch.Tensor]:
    """Every number the accumulators hold, as tensors."""
    n, h, qk = acc["norm"], acc["hessian"], acc["qk"]
    return {"sumsq": n.sumsq, "norm_tokens": torch.tensor(n.tokens), "H": h.H, "h_tokens": torch.tensor(h.tokens),
            "qk": qk.qk, "q": qk.q, "k": qk.k, "kmin": qk.kmin, "kmax": qk.kmax, "qk_tokens": torch.tensor(qk.tokens)}


def main(out: Path) -> None:
    torch.manual_seed(0)
    dist.init_process_group("gloo")
    rank = distributed.rank()
    acc = accumulate(distributed.shard(windows()))
    distributed.reduce_stats({"targets": {"q_proj": acc["norm"], "k_proj": acc["norm"], "up_proj": acc["hessian"]},
                              "observed": {"ds": {"self_attn": acc["qk"]}}})
    saved = state(acc)
    try:
        with distributed.agreed():
            if rank == 1:
                raise UserError("rank 1 alone failed")
    except UserError as e:
        saved["agreed"] = f"{e} [exit {e.exit_code}]"
    try:
        distributed.shard([{}])
    except UserError as e:
        saved["shard"] = str(e)
    torch.save(saved, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
