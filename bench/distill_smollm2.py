"""Sparse distillation on the real SmolLM2-135M: held-out perplexity dense / 2:4 SparseGPT / distilled.

    python bench/distill_smollm2.py [--steps 20] [--lr 1e-4] [--feature-weight 1.0] [--mode auto]

Stages: resolve the built-in ``smollm2-135m`` alias (GGUF converted once into ``--cache``); dense
perplexity; SparseGPT 2:4 with the built-in calibration text (``--samples`` random 512-token
windows); perplexity; `sparsify.distill.distill_model` on the same calibration data; perplexity.
Perplexity: 32 non-overlapping 512-token windows of the built-in held-out split (different articles).
The mask is checked position by position (and by count) before vs after distillation. The pruned
weights (and their perplexity) are cached in ``--cache`` so a rerun skips pruning (its time is then
read from the cache record).
Prints a table and writes ``bench/results/distill_smollm2.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sparsify import progress
from sparsify.calibrate.data import eval_windows, load_text
from sparsify.config import CalibConfig, PruneConfig
from sparsify.distill import distill_model
from sparsify.eval.perplexity import perplexity
from sparsify.models.load import load_model, resolve
from sparsify.pipeline import peak_rss_mb, prune_model, select_targets
from sparsify.registry import PRUNERS, get

OUT = Path(__file__).parent / "results" / "distill_smollm2.json"


@contextmanager
def _step_printer(description: str, total: int):
    """Stands in for `sparsify.progress.bar` here: one line per step with the elapsed time (logs, not a tty)."""
    t0, done = time.perf_counter(), [0]

    def advance(n=1):
        done[0] += n
        print(f"  {description} {done[0]}/{total}  {time.perf_counter() - t0:.0f} s", flush=True)

    yield advance


def _ppl(model, windows) -> float:
    t = time.perf_counter()
    ppl = perplexity(model, windows, batch_size=4)["perplexity"]
    print(f"  perplexity {ppl:.2f} ({time.perf_counter() - t:.0f} s)", flush=True)
    return ppl


def _digest(*parts) -> str:
    """Short content hash, so a cache entry never outlives the data (built-in text) it was made from."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.numpy().tobytes() if isinstance(p, torch.Tensor) else str(p).encode())
    return h.hexdigest()[:12]


def _pruned(loaded, config, cache: Path) -> tuple[dict, Path]:
    """SparseGPT 2:4 in place, or its cached result; returns (pruned Linears, path of the cache record)."""
    c = config.calib
    key = _digest(load_text(c.source, "calib"), c.samples, c.seq_len, c.seed)
    path = cache / f"pruned_sparsegpt_2-4_{c.samples}x{c.seq_len}_{key}.safetensors"
    record = path.with_suffix(".json")
    if path.exists() and record.exists():
        flat = {n: lin for block in select_targets(loaded.model, config)[0].values() for n, lin in block.items()}
        state = load_file(str(path))
        for n, lin in flat.items():
            lin.weight.data.copy_(state[n])
        return flat, record
    pruner = get(PRUNERS, "sparsegpt", "method")
    t = time.perf_counter()
    flat, _, _, _ = prune_model(loaded, config, pruner, pruner.config_cls())
    prune_s = time.perf_counter() - t
    save_file({n: lin.weight.detach().contiguous() for n, lin in flat.items()}, str(path))
    record.write_text(json.dumps({"prune_s": prune_s}))
    return flat, record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--feature-weight", type=float, default=1.0)
    ap.add_argument("--samples-per-step", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--mode", default="auto")
    ap.add_argument("--samples", type=int, default=64, help="calibration windows (pruning and distillation)")
    ap.add_argument("--cache", default="/tmp/distill_cache")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(2)
    progress.bar = _step_printer
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)

    source = resolve("smollm2-135m", cache_dir=str(cache))
    loaded = load_model(source, dtype="float32")
    windows = eval_windows(loaded.tokenizer, load_text("builtin", "eval"), 512, max_windows=32)  # (32, 512)
    config = PruneConfig(method="sparsegpt", scheme="2:4", distill_steps=args.steps,
                         calib=CalibConfig(source="builtin", samples=args.samples, seq_len=512, batch_size=4))
    dense_cache = cache / f"dense_ppl_{_digest(windows)}.json"
    print("dense", flush=True)
    dense = json.loads(dense_cache.read_text())["ppl"] if dense_cache.exists() else _ppl(loaded.model, windows)
    dense_cache.write_text(json.dumps({"ppl": dense}))
    print("pruning (SparseGPT 2:4)", flush=True)
    flat, record = _pruned(loaded, config, cache)
    meta = json.loads(record.read_text())
    pruned, prune_s = meta.get("ppl") or _ppl(loaded.model, windows), meta["prune_s"]
    record.write_text(json.dumps({**meta, "ppl": pruned}))
    before = {n: lin.weight.detach() != 0 for n, lin in flat.items()}
    old = {n: lin.weight.detach().clone() for n, lin in flat.items()}

    print(f"distilling {args.steps} steps", flush=True)
    info = distill_model(loaded, flat, {n: None for n in flat}, config, source, lr=args.lr,
                         feature_weight=args.feature_weight, samples_per_step=args.samples_per_step,
                         micro_batch=args.micro_batch, mode=args.mode)
    after = {n: lin.weight.detach() != 0 for n, lin in flat.items()}
    same_positions = all(torch.equal(before[n], after[n]) for n in flat)
    kept_before, kept_after = (sum(int(m[n].sum()) for n in flat) for m in (before, after))
    changed = sum(int((lin.weight.detach() != old[n]).sum()) for n, lin in flat.items())
    distilled = _ppl(loaded.model, windows)

    result = {"model": "SmolLM2-135M-Instruct (fp32)", "method": "sparsegpt", "scheme": "2:4",
              "calibration": {"source": "builtin", "samples": args.samples, "seq_len": 512},
              "eval": {"source": "builtin eval split", "windows": len(windows), "seq_len": 512},
              "perplexity": {"dense": dense, "pruned": pruned, "distilled": distilled},
              "drop_pct": 100 * (pruned - distilled) / pruned, "prune_s": round(prune_s, 1),
              "mask": {"same_positions": same_positions, "kept_before": kept_before, "kept_after": kept_after,
                       "weights_changed": changed},
              "distill": info, "process_peak_rss_mb": round(peak_rss_mb(), 1), "threads": torch.get_num_threads(),
              "load_average_1m": os.getloadavg()[0]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    rows = [("dense perplexity", f"{dense:.2f}"), ("2:4 SparseGPT perplexity", f"{pruned:.2f}"),
            (f"distilled ({info['steps']} steps, {info['mode']})", f"{distilled:.2f}"),
            ("perplexity drop", f"{result['drop_pct']:.1f}%"), ("distill wall", f"{info['wall_s']:.0f} s"),
            ("distill CPU time", f"{info['cpu_s']:.0f} s"), ("distill peak RSS", f"{info['peak_rss_mb']:.0f} MB"),
            ("loss first -> last", f"{info['loss_first']:.4f} -> {info['loss_last']:.4f}"),
            ("mask positions unchanged", str(same_positions)),
            ("kept weights before / after", f"{kept_before} / {kept_after}"),
            ("kept weights changed", str(changed))]
    for k, v in rows:
        print(f"{k:<36} {v}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
