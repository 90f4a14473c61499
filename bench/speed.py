"""CPU speed of SmolLM2-135M packed artifacts against the dense float32 model, side by side in one process.

Prunes SmolLM2 with Wanda 2:4, unquantized, int8 and int4 (group 128), or reuses those artifacts, loads
the dense source and all three, and times them interleaved (`sparsify.eval.generation`: each repetition
runs every model once per case, in a shuffled order; medians reported): prefill tokens/s of a 128-token
prompt, decode tokens/s with the KV cache at batch 1 and 8. Per model: the bytes it holds (parameters
and buffers, plus the dispatch caches built for it), how far its runs raised resident memory, and which
CPU kernel its packed layers run at decode. Issue #13's targets (batch-1 decode over dense float32):
2:4 int8 >= 1.5x, 2:4 int4 >= 1.5x, 2:4 >= 1.0x. Prints a table, writes bench/results/speed_smollm2.json.

    python bench/speed.py                        # threads: torch's default
    python bench/speed.py --threads 1 --reps 5   # one core (a shared machine: see the README's CPU section)
    python bench/speed.py --official /tmp/wanda --prune-only   # prune time against the official code

``--official REPO`` first runs `bench/prune_speed.py` (issue #13's prune-time targets: sparsify /
official Wanda 2:4 <= 0.9, SparseGPT 2:4 <= 0.7, side by side in this process), which writes
bench/results/prune_speed_smollm2.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
VARIANTS = {"2:4": [], "2:4+int8": ["--quant", "int8"], "2:4+int4": ["--quant", "int4"]}
TARGETS = {"2:4+int8": 1.5, "2:4+int4": 1.5, "2:4": 1.0}


def artifacts(model: str, where: Path, samples: int, seq_len: int) -> dict[str, Path]:
    """Each variant's artifact under ``where``, pruned now unless it is already there."""
    from quality import sparsify

    out = {}
    where.mkdir(parents=True, exist_ok=True)
    for name, extra in VARIANTS.items():
        path = where / ("wanda-" + name.replace(":", "").replace("+", "-"))
        if not (path / "sparsify.json").is_file():
            print(f"pruning {name} -> {path}", file=sys.stderr, flush=True)
            sparsify("prune", model, "--method", "wanda", "--scheme", "2:4", *extra, "--samples", str(samples),
                     "--seq-len", str(seq_len), "-o", str(path))
        out[name] = path
    return out


def kernels_at(model, tokens: int) -> dict[str, int]:
    """How many packed layers run which CPU kernel for ``tokens`` tokens."""
    import torch

    from sparsify import kernels
    from sparsify.runtime.densify import sparse_modules

    return dict(Counter(kernels.kernel_name(torch.empty(tokens, m.in_features), m.fmt, m.attrs, m.packed())
                        for m in sparse_modules(model).values()))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--artifacts", default=None, help="artifact folder (default: $SPARSIFY_CACHE/bench-speed)")
    ap.add_argument("--samples", type=int, default=16, help="Wanda calibration samples (speed does not depend on them)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "speed_smollm2.json"))
    ap.add_argument("--official", default=None, metavar="REPO",
                    help="also time pruning against this checkout of github.com/locuslab/wanda (bench/prune_speed.py)")
    ap.add_argument("--prune-only", action="store_true", help="with --official: skip the runtime measurements")
    args = ap.parse_args(argv)
    if args.official:
        import prune_speed

        prune_speed.main(["--repo", args.official, "--model", args.model])
        if args.prune_only:
            return {}
    import torch

    from quality import print_table, write_results
    from sparsify.eval.generation import generation
    from sparsify.kernels.cpu import native, paths as cpu_paths
    from sparsify.models.aliases import cache_root
    from sparsify.runtime.load import load_artifact, open_model

    where = Path(args.artifacts) if args.artifacts else cache_root() / "bench-speed"
    paths = artifacts(args.model, where, args.samples, args.seq_len)
    if args.threads:
        torch.set_num_threads(args.threads)
    dense, _ = open_model(args.model)
    loaded = {name: load_artifact(p) for name, p in paths.items()}
    models = {"dense": dense.model, **{name: lm.model for name, (lm, _) in loaded.items()}}
    load_before = os.getloadavg()
    gen = generation(dense, models, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, device="cpu",
                     reps=args.reps)
    rows = []
    for name in models:
        row = {"model": name, "MB held": (gen["memory"][name]["weights_bytes"] +
                                          gen["memory"][name]["dispatch_cache_bytes"]) / 2**20,
               "MB cache": gen["memory"][name]["dispatch_cache_bytes"] / 2**20,
               "MB rss+": gen["memory"][name]["rss_growth_bytes"] / 2**20}
        for r in gen["rows"]:
            key = f"{r['phase']} b{r['batch']}"
            row[key] = r[f"{name}_per_s"]
            row[key + " x"] = r["speedup"].get(name, 1.0)
        rows.append(row)
    cols = [("model", "model", 9, ""), ("MB held", "MB held", 8, ".1f"), ("MB cache", "MB cache", 8, ".1f"),
            ("MB rss+", "MB rss+", 8, ".1f")]
    for r in gen["rows"]:
        key = f"{r['phase']} b{r['batch']}"
        cols += [(f"{key} tok/s", key, 15, ".1f"), ("x dense", key + " x", 8, ".2f")]
    print_table(rows, cols)
    decode1 = next(r for r in gen["rows"] if r["phase"] == "decode" and r["batch"] == 1)
    targets = {name: {"target": t, "speedup": decode1["speedup"][name], "met": decode1["speedup"][name] >= t}
               for name, t in TARGETS.items()}
    for name, t in targets.items():
        print(f"{name}: batch-1 decode {t['speedup']:.3f}x dense (target {t['target']}x): "
              f"{'met' if t['met'] else 'MISSED'}")
    result = {"model": args.model, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "c_kernel": native.unavailable() or "built",
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "cpu_cache_dense": os.environ.get("SPARSIFY_CPU_CACHE", "0"),
              "artifacts": {k: str(v) for k, v in paths.items()},
              "packed_bytes": {name: m["totals"]["packed_bytes"] for name, (_, m) in loaded.items()},
              "dispatch_table": {"|".join(k): v for k, v in cpu_paths.CPU_MAX_TOKENS.items()},
              "kernels_at_decode": {name: {b: kernels_at(lm.model, b) for b in (1, 8)}
                                    for name, (lm, _) in loaded.items()},
              "generation": gen, "targets": targets, "table": rows}
    write_results(Path(args.out), result)
    print(f"results -> {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
