"""Quality benchmark: perplexity of pruned SmolLM2-135M for each baseline method and scheme.

Every configuration runs as its own `sparsify prune` / `sparsify eval` process, so wall time and
peak RSS are those of that run alone. Also times two dense forward passes over the same
calibration set: the information limit for a calibrated pruner (one pass to collect statistics,
one to propagate). Prints a table and writes bench/results/quality_<model>.json.

    python bench/quality.py                       # the committed run (SmolLM2, 64 x 512 calib, 32 x 512 eval)
    python bench/quality.py --suite quant         # issue 3 rows: 2:4 + int8 / int4, joint vs round-to-nearest
    python bench/quality.py --suite distill       # 2:4 SparseGPT with and without --distill-steps
    python bench/quality.py --suite admm --admm-repo /tmp/admm   # issue 14: ADMM rows beside the ADMM-Grad code
    python bench/quality.py --suite best --admm-repo /tmp/admm   # issue 14: --preset best (+ int8) beside SparseGPT
    python bench/quality.py --model DIR --samples 4 --seq-len 64 --windows 2 --methods magnitude --out /tmp/q.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sparsify(*args: str) -> dict:
    cmd = [sys.executable, "-m", "sparsify.cli", *args, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SPARSIFY_PROGRESS": "0"})
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def protocol_parser(doc: str) -> argparse.ArgumentParser:
    """The reference protocol's options, shared by the quality benchmarks (SmolLM2, 64 x 512 calib, 32 x 512 eval)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def cpu_model() -> str:
    """The CPU's model name (Linux), or the platform's processor string: float32 results of a solver
    like SparseGPT move by a few percent between CPU vendors, so every result says which one ran it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def write_results(path: Path, result: dict) -> None:
    """``result`` plus the machine it ran on, as JSON at ``path`` (folders made as needed)."""
    result["machine"] = {"cpu_count": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform(),
                         "python": platform.python_version()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


def print_table(rows: list[dict], columns: list[tuple[str, str, int, str]]) -> None:
    """One line per row; ``columns`` are (header, key, width, format), e.g. ("ppl", "perplexity", 9, ".2f");
    text columns (empty format) are left-aligned, numbers right-aligned."""
    print(" ".join(format(h, f"{'>' if f else '<'}{w}") for h, _, w, f in columns))
    for r in rows:
        print(" ".join(format(r[k], f"{'>' if f else '<'}{w}{f}") for _, k, w, f in columns))


def protocol(args, name: str) -> tuple[Path, list[str], list[str]]:
    """(results file, calibration flags, evaluation flags) of the reference protocol for benchmark ``name``.

    Artifacts are evaluated with the flags plus ``--no-baseline``: each script evaluates the dense
    model once itself, where `sparsify eval` would re-run it beside every artifact.
    """
    model = Path(args.model).name.replace("-135m", "")
    out = Path(args.out or ROOT / "bench" / "results" / f"{name}_{model}.json")
    calib = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--seed", str(args.seed)]
    return out, calib, ["--seq-len", str(args.seq_len), "--windows", str(args.windows)]


def dense_forward_seconds(model: str, samples: int, seq_len: int, seed: int) -> float:
    """Wall time of one forward pass over the calibration set, in a fresh process (same batches as prune)."""
    code = f"""
import time, torch
from sparsify.config import CalibConfig
from sparsify.calibrate.batches import build_batches
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


def masks_of(artifact: Path) -> dict:
    """Every packed Linear's non-zero pattern (out, in) bool, by module name, read back from the artifact."""
    import sparsify
    from sparsify.runtime.sparse_linear import SparseLinear

    model = sparsify.load(artifact)[0].model
    return {n: m.dense_weight() != 0 for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def mask_diff(a: dict, b: dict) -> int:
    """Positions where two artifacts' masks differ (a missing or reshaped tensor counts whole)."""
    return sum(int((a[k] != b[k]).sum()) if k in b and a[k].shape == b[k].shape else a[k].numel()
               for k in a) + sum(b[k].numel() for k in b.keys() - a.keys())


def runs(suite: str, methods: list[str], schemes: list[str], distill_steps: int) -> list[tuple[str, list[str]]]:
    """(label, prune args) for each configuration of a suite."""
    spine = [(f"{m} {s}", ["--method", m, "--scheme", s, "--sparsity", "0.5"]) for m in methods for s in schemes]
    sgpt = ["--method", "sparsegpt", "--scheme", "2:4"]
    quant = [("sparsegpt 2:4 int8 joint", sgpt + ["--quant", "int8"]),
             ("sparsegpt 2:4 int4-g128 joint", sgpt + ["--quant", "int4", "--group-size", "128"]),
             ("sparsegpt 2:4 int4-g128 rtn", sgpt + ["--quant", "int4", "--group-size", "128", "--rtn-quant"])]
    distill = [("sparsegpt 2:4 distill 0", sgpt),
               (f"sparsegpt 2:4 distill {distill_steps}", sgpt + ["--distill-steps", str(distill_steps)])]
    admm = [("sparsegpt 2:4", sgpt), ("admm 2:4", ["--method", "admm", "--scheme", "2:4"]),
            ("admm 2:4 fixed wanda mask", ["--method", "admm", "--scheme", "2:4", "--method-arg", "gradual=0"]),
            ("admm 2:4 int8 joint", ["--method", "admm", "--scheme", "2:4", "--quant", "int8"])]
    best_2_4, best_distill = ["--preset", "best", "--scheme", "2:4"], ["--distill-steps", "4", "--distill-lr", "5e-4"]
    admm_2_4 = ["--method", "admm", "--scheme", "2:4"]
    best = [("sparsegpt 2:4", sgpt), ("sparsegpt 2:4 int8 joint", sgpt + ["--quant", "int8"]),
            ("preset best 2:4", best_2_4),
            ("preset best 2:4 int8 (quantized after distillation)", best_2_4 + ["--quant", "int8"]),
            ("preset best 2:4 int8 --distill-quant fixed", best_2_4 + ["--quant", "int8", "--distill-quant", "fixed"]),
            ("admm 2:4 + best's distillation", admm_2_4 + best_distill),
            ("admm 2:4 int8 + best's distillation", admm_2_4 + best_distill + ["--quant", "int8"])]
    table = {"spine": spine, "quant": quant, "distill": distill, "admm": admm, "best": best}
    return [r for name in (table if suite == "all" else suite.split(",")) for r in table[name]]


def time_vs_sparsegpt(rows: list[dict]) -> None:
    """Each row's ``total_s`` (prune plus any distillation: the manifest's prune_s stops before it) and its
    ratio to the "sparsegpt 2:4" row's, in place."""
    for r in rows:
        if r.get("prune_s") is not None:
            r["total_s"] = round(r["prune_s"] + ((r.get("distill") or {}).get("wall_s") or 0.0), 2)
    base = next((r["total_s"] for r in rows if r["config"] == "sparsegpt 2:4"), None)
    for r in rows:
        if base and r.get("total_s"):
            r["time_vs_sparsegpt_2_4"] = round(r["total_s"] / base, 3)


def main() -> None:
    ap = protocol_parser(__doc__)
    ap.add_argument("--suite", default="spine", help="spine | quant | distill | all, or a comma list")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--schemes", default="unstructured,2:4,4:8")
    ap.add_argument("--distill-steps", type=int, default=20)
    ap.add_argument("--admm-repo", default=None, help="checkout of github.com/fmfi-compbio/admm-pruning: adds its "
                                                       "ADMM-Grad 2:4 as a row, run on the same batches (official_check)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    suffix = "" if args.suite == "spine" else "_" + args.suite.replace(",", "_")
    out_json, calib, ev = protocol(args, f"quality{suffix}")
    fwd = dense_forward_seconds(args.model, args.samples, args.seq_len, args.seed)
    dense = sparsify("eval", args.model, *ev)
    rows = [{"config": "dense", "perplexity": dense["perplexity"]["perplexity"], "sparsity": 0.0}]
    masks = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, prune_args) in enumerate(runs(args.suite, args.methods.split(","), args.schemes.split(","),
                                                     args.distill_steps)):
            out = Path(tmp) / f"run{i}"
            t = time.perf_counter()
            m = sparsify("prune", args.model, *prune_args, "-o", str(out), *calib)
            wall = time.perf_counter() - t
            r = sparsify("eval", str(out), *ev, "--no-baseline")
            tim = m["timing"]
            mask = {}
            if label.startswith("sparsegpt 2:4 distill"):  # the distilled mask must equal the undistilled one
                masks = masks or masks_of(out)  # the first distill row (0 steps) is the reference
                mask = {"mask_vs_distill_0_differing": mask_diff(masks, masks_of(out)),
                        "mask_positions": sum(v.numel() for v in masks.values())}
            rows.append({"config": label, "args": prune_args, "perplexity": r["perplexity"]["perplexity"],
                         "sparsity": m["totals"]["sparsity"], "bytes_ratio": m["totals"]["ratio"],
                         "prune_s": tim["prune_s"], "calibrate_prune_s": tim["calibrate_prune_s"],
                         "process_s": round(wall, 1), "peak_rss_mb": tim["peak_rss_mb"],
                         "calibrate_prune_over_2_forwards": round(tim["calibrate_prune_s"] / (2 * fwd), 2),
                         "distill": m.get("distill"), **mask})
            print(json.dumps(rows[-1]), file=sys.stderr)
    if args.admm_repo:
        from official_check import in_fresh_process, run_official

        r = in_fresh_process(run_official, args.admm_repo, "admm", "2:4", args)
        rows.append({"config": "ADMM-Grad 2:4 (official code)", "perplexity": r["perplexity"], "sparsity": 0.5,
                     "prune_s": r["prune_s"], "calibrate_prune_s": r["prune_s"], "peak_rss_mb": r["peak_rss_mb"],
                     "repo": "github.com/fmfi-compbio/admm-pruning"})
        print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"model": args.model, "suite": args.suite,
              "calibration": {"source": "builtin", "samples": args.samples, "seq_len": args.seq_len, "seed": args.seed},
              "evaluation": {"data": "builtin eval split", "seq_len": args.seq_len,
                             "windows": dense["perplexity"]["windows"], "tokens": dense["perplexity"]["tokens"]},
              "dense_forward_s": round(fwd, 2), "rows": rows}
    time_vs_sparsegpt(rows)
    write_results(out_json, result)
    print(f"{'config':<32} {'ppl':>9} {'sparsity':>9} {'bytes':>6} {'prune s':>8} {'/2fwd':>6} {'RSS MB':>7}")
    for r in rows:
        print(f"{r['config']:<32} {r['perplexity']:>9.2f} {r['sparsity']:>9.3f} {r.get('bytes_ratio', 1):>6.3f} "
              f"{r.get('prune_s', 0):>8.1f} {r.get('calibrate_prune_over_2_forwards', 0):>6.2f} "
              f"{r.get('peak_rss_mb', 0):>7.0f}")
    for r in rows:
        if r.get("distill"):
            print(f"{r['config']}: distillation {r['distill']['wall_s']:.0f} s wall ({r['distill']['mode']}), "
                  f"peak RSS {r['distill']['peak_rss_mb']:.0f} MB, mask positions differing from 0 steps: "
                  f"{r.get('mask_vs_distill_0_differing')} of {r.get('mask_positions')}")
    print(f"dense forward over the calibration set: {fwd:.1f} s (the /2fwd column: calibrate+prune time over two "
          f"such passes); results -> {out_json}")


if __name__ == "__main__":
    main()
