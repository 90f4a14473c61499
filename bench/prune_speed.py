"""Prune time: sparsify against the official Wanda / SparseGPT code, side by side in one process.

For each config (default Wanda 2:4 and SparseGPT 2:4 on SmolLM2-135M, 64 x 512 calibration tokens),
each repetition runs the official pruner (`bench/official_check.py`: github.com/locuslab/wanda's
``prune_wanda`` / ``prune_sparsegpt``, which vendors IST-DASLab's SparseGPT) and `sparsify prune`
(the library call, same threads) on the same model and the same calibration
batches, alternating which goes first, each run in a fresh spawned process (neither side inherits
the other's allocator state, caches or process-wide settings). Timed: the official pruning call, and sparsify's
``calibrate_prune_s`` (its manifest's time from a loaded model to pruned weights, which also
includes building the calibration batches: counted against sparsify). Model loading, artifact
writing and evaluation are not timed. Both results are evaluated on the same 32 x 512 held-out
windows, so equal perplexity shows that the two computed the same method. Issue #13's targets:
sparsify / official at most 0.9 for Wanda 2:4 and 0.7 for SparseGPT 2:4.

    git clone https://github.com/locuslab/wanda /tmp/wanda   # once
    python bench/prune_speed.py --repo /tmp/wanda [--configs wanda:2:4,sparsegpt:2:4] [--reps 1]

Also run by ``python bench/speed.py --official /tmp/wanda``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
TARGETS = {"wanda 2:4": 0.9, "sparsegpt 2:4": 0.7}


def ours(method: str, scheme: str, args, where: Path) -> dict:
    """sparsify's prune of the same model and data: its calibrate+prune seconds and perplexity."""
    from sparsify.calibrate.data import eval_windows, load_text
    from sparsify.config import CalibConfig, PruneConfig
    from sparsify.eval.perplexity import perplexity
    from sparsify.runtime.load import load_artifact

    from sparsify.pipeline import prune

    out = where / f"{method}-{scheme.replace(':', '')}"
    config = PruneConfig(method=method, scheme=scheme, sparsity=0.5,
                         calib=CalibConfig(samples=args.samples, seq_len=args.seq_len, seed=args.seed))
    manifest = prune(args.model, config, out, overwrite=True)
    lm, _ = load_artifact(out)
    windows = eval_windows(lm.tokenizer, load_text("builtin", "eval"), args.seq_len, args.windows)
    return {"prune_s": manifest["timing"]["calibrate_prune_s"], "perplexity": perplexity(lm.model, windows)["perplexity"],
            "peak_rss_mb": manifest["timing"]["peak_rss_mb"]}


def _ours_in_tmp(method: str, scheme: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="sparsify-prune-speed-") as tmp:
        return ours(method, scheme, args, Path(tmp))


def measure(repo: str, args) -> dict:
    """{"rows": one per config with both times, their ratio and the target, "load_average": ...}."""
    from official_check import _official, in_fresh_process, run_official

    _official(repo)  # a bad --repo fails here, before any run
    load_before, rows = os.getloadavg(), []
    for config in args.configs.split(","):
        method, scheme = config.split(":", 1)
        runs = {"official": [], "sparsify": []}
        for rep in range(args.reps):
            order = ["official", "sparsify"] if rep % 2 == 0 else ["sparsify", "official"]
            for who in order:
                r = in_fresh_process(run_official, repo, method, scheme, args) if who == "official" else \
                    in_fresh_process(_ours_in_tmp, method, scheme, args)
                runs[who].append(r)
                print(f"{config} {who}: {r['prune_s']:.1f} s, perplexity {r['perplexity']:.3f}",
                      file=sys.stderr, flush=True)
        name = f"{method} {scheme}"
        med = {who: statistics.median(r["prune_s"] for r in rs) for who, rs in runs.items()}
        ratio = med["sparsify"] / max(med["official"], 1e-3)  # a stand-in official run may take ~0 s
        target = TARGETS.get(name)
        rows.append({"config": name, "official_s": med["official"], "sparsify_s": med["sparsify"],
                     "ratio": round(ratio, 3), "target": target, "met": None if target is None else ratio <= target,
                     "official_perplexity": runs["official"][0]["perplexity"],
                     "sparsify_perplexity": runs["sparsify"][0]["perplexity"], "runs": runs})
    return {"official_repo": "github.com/locuslab/wanda", "model": args.model,
            "calibration": {"samples": args.samples, "seq_len": args.seq_len, "seed": args.seed},
            "eval_windows": args.windows, "reps": args.reps, "load_average_before": load_before,
            "load_average_after": os.getloadavg(), "rows": rows}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True, help="local checkout of github.com/locuslab/wanda")
    add_options(ap)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prune_speed_smollm2.json"))
    return ap


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="smollm2-135m", help="a Llama-layout causal LM (the official code's layout)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--configs", default="wanda:2:4,sparsegpt:2:4")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=1, help="runs per side per config (medians; the order alternates)")


def report(result: dict) -> None:
    from quality import print_table

    print_table(result["rows"], [("config", "config", 14, ""), ("official s", "official_s", 11, ".1f"),
                                 ("sparsify s", "sparsify_s", 11, ".1f"), ("ratio", "ratio", 6, ".3f"),
                                 ("official ppl", "official_perplexity", 12, ".2f"),
                                 ("sparsify ppl", "sparsify_perplexity", 12, ".2f")])
    for r in result["rows"]:
        if r["target"] is not None:
            print(f"{r['config']}: sparsify / official {r['ratio']:.3f} (target <= {r['target']}): "
                  f"{'met' if r['met'] else 'MISSED'}")


def main(argv=None) -> dict:
    from quality import write_results

    args = parser().parse_args(argv)
    result = measure(args.repo, args)
    report(result)
    write_results(Path(args.out), result)
    print(f"results -> {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
