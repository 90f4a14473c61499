"""Quality benchmark: perplexity of pruned SmolLM2-135M for each baseline method and scheme.

Every configuration runs as its own `sparsify prune` / `sparsify eval` process, so wall time and
peak RSS are those of that run alone. Also times two dense forward passes over the same
calibration set: the information limit for a calibrated pruner (one pass to collect statistics,
one to propagate). Prints a table and writes bench/results/quality_<model>.json.

    python bench/quality.py                       # the committed run (SmolLM2, 64 x 512 calib, 32 x 512 eval)
    python bench/quality.py --model DIR --samples 4 --seq-len 64 --windows 2 --methods magnitude --out /tmp/q.json
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sparsify(*args: str) -> dict:
    cmd = [sys.executable, "-m", "sparsify.cli", *args, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "SPARSIFY_PROGRESS": "0"})
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def dense_forward_seconds(model: str, samples: int, seq_len: int, seed: int) -> float:
    """Wall time of one forward pass over the calibration set, in a fresh process (same batches as prune)."""
    code = f"""
import time, torch
from sparsify.config import CalibConfig
from sparsify.calibrate.data import build_batches
from sparsify.models.load import load_model, resolve
lm = load_model(resolve({model!r}))
batches = build_batches('text', CalibConfig(samples={samples}, seq_len={seq_len}, seed={seed}), tokenizer=lm.tokenizer)
with torch.inference_mode():
    lm.model(**batches[0])
    t = time.perf_counter()
    for b in batches:
        lm.model(**b)
print(time.perf_counter() - t)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--schemes", default="unstructured,2:4,4:8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    name = Path(args.model).name.replace("-135m", "")
    out_json = Path(args.out or ROOT / "bench" / "results" / f"quality_{name}.json")
    calib = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--seed", str(args.seed)]
    ev = ["--seq-len", str(args.seq_len), "--windows", str(args.windows)]
    rows = []
    fwd = dense_forward_seconds(args.model, args.samples, args.seq_len, args.seed)
    dense = sparsify("eval", args.model, *ev)
    rows.append({"method": "dense", "scheme": "-", "perplexity": dense["perplexity"]["perplexity"], "sparsity": 0.0})
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for scheme in args.schemes.split(","):
                out = Path(tmp) / f"{method}-{scheme.replace(':', 'of')}"
                t = time.perf_counter()
                m = sparsify("prune", args.model, "--method", method, "--scheme", scheme, "--sparsity", "0.5",
                             "-o", str(out), *calib)
                wall = time.perf_counter() - t
                r = sparsify("eval", str(out), *ev)
                rows.append({"method": method, "scheme": scheme, "perplexity": r["perplexity"]["perplexity"],
                             "sparsity": m["totals"]["sparsity"], "prune_s": m["timing"]["prune_s"],
                             "process_s": round(wall, 1), "peak_rss_mb": m["timing"]["peak_rss_mb"],
                             "prune_over_2_forwards": round(m["timing"]["prune_s"] / (2 * fwd), 2)})
                print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"model": args.model, "calibration": {"source": "builtin", "samples": args.samples,
              "seq_len": args.seq_len, "seed": args.seed},
              "evaluation": {"data": "builtin eval split", "seq_len": args.seq_len, "windows": dense["perplexity"]["windows"],
                             "tokens": dense["perplexity"]["tokens"]},
              "dense_forward_s": round(fwd, 2), "machine": {"cpu_count": __import__("os").cpu_count(),
              "platform": platform.platform(), "python": platform.python_version()}, "rows": rows}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1))
    print(f"{'method':<10} {'scheme':<13} {'ppl':>9} {'sparsity':>9} {'prune s':>8} {'/2fwd':>6} {'RSS MB':>7}")
    for r in rows:
        print(f"{r['method']:<10} {r['scheme']:<13} {r['perplexity']:>9.2f} {r['sparsity']:>9.3f} "
              f"{r.get('prune_s', 0):>8.1f} {r.get('prune_over_2_forwards', 0):>6.2f} {r.get('peak_rss_mb', 0):>7.0f}")
    print(f"dense forward over the calibration set: {fwd:.1f} s; results -> {out_json}")


if __name__ == "__main__":
    main()
