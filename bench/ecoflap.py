"""ECoFLaP benchmark: ECoFLaP (first order) against uniform and OWL allocation, with Wanda and SparseGPT, on SmolLM2-135M.

Same protocol as bench/quality.py and bench/allocation.py (built-in encyclopedia text: 64 x 512
calibration tokens, 32 x 512 held-out tokens that never overlap them, fp32 on CPU). Each variant
``METHOD:ALLOCATION[/FLAG=VALUE...][@TARGETS]`` (`DEFAULT_VARIANTS`: uniform, OWL and ECoFLaP with
Wanda at every target; ECoFLaP scored on 32 sequences (the reference scripts' number), and with
S_max = S + 0.2, at 60% and 70%; uniform and ECoFLaP (S_max = S + 0.1 and S + 0.2) with SparseGPT at
60% and 70%; ECoFLaP(wanda) with |G * W| scores at S + 0.2) runs as its own `sparsify prune` process, then
`sparsify eval`. ECoFLaP's defaults: block groups, first-order scores over every calibration
sequence, S_max = S + 0.1. The scores do not depend on the sparsity nor on the local method: the
first ECoFLaP run with a given number of score samples writes them to a scores file
(``--allocation-arg scores_file=...``) and the later ones read them (``scores_reused``); their
``prune_with_scoring_s`` adds the scoring back, the cost of running them alone. Reports held-out
perplexity, the ratios to the same method's uniform and OWL rows, the time against uniform Wanda's,
the realised global sparsity (from the packed weights), and the per-block sparsities and scores.

Zeroth-order speed (``--zo-blocks``, a subset of the block groups, on the first ``--zo-samples``
calibration sequences): the batched, cached estimator against the naive loop (weights perturbed in
place, the whole model run twice per sequence), same directions, no early stop (so both draw the same
samples), in one fresh process; reports both wall times, their ratio and the largest relative
difference of the estimates; then the batched estimator once more with its default early stop (``--zo-rtol``
to choose another; `sparsify/allocators/ecoflap_stop.py`), with the draws each group took and the first group's pilot.

    python bench/ecoflap.py                                   # the committed run
    python bench/ecoflap.py --variants ''                     # only the zeroth-order timing
    python bench/ecoflap.py --model DIR --samples 4 --seq-len 64 --windows 2 --sparsities 0.7 \\
        --variants wanda:uniform,wanda:ecoflap --zo-blocks 0,1 --zo-samples 2 --out /tmp/e.json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import protocol, protocol_parser, sparsify, write_results  # noqa: E402  (bench scripts share the subprocess runner)

ZO_CODE = """
import json, sys, time, torch
from sparsify.allocators.ecoflap_loss import objective_for
from sparsify.allocators.ecoflap_scores import Group, ZerothOrder, naive_zeroth_order_scores, zeroth_order_scores
from sparsify.allocators.ecoflap_stop import Pool
from sparsify.calibrate.batches import calibration_batches
from sparsify.config import CalibConfig
from sparsify.models.layout import find_blocks, find_targets
from sparsify.models.load import load_model, resolve
model, samples, seq_len, seed, picks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rtol = float(sys.argv[6]) if sys.argv[6] else ZerothOrder().rtol
lm = load_model(resolve(model), dtype="float32")
batches = calibration_batches(lm, CalibConfig(source="builtin", samples=samples, seq_len=seq_len, seed=seed, batch_size=8))
blocks = find_blocks(lm.model)
prefix = blocks[0][0]
targets = find_targets(lm.model)
picked = [int(i) for i in picks.split(",")]
groups = [Group(f"{prefix}.{i}", {n: lm.model.get_submodule(n) for n in targets[f"{prefix}.{i}"]}, prefix, i) for i in picked]
objective = objective_for(lm.family.name)
exact = ZerothOrder(rtol=0.0, seed=seed)
with torch.inference_mode():
    lm.model(**batches[0])  # warm-up
t = time.perf_counter(); fast = zeroth_order_scores(lm.model, blocks, groups, objective, batches, exact); fast_s = time.perf_counter() - t
t = time.perf_counter(); naive = naive_zeroth_order_scores(lm.model, groups, objective, batches, exact); naive_s = time.perf_counter() - t
default, pool = ZerothOrder(rtol=rtol, seed=seed), Pool()
t = time.perf_counter(); stop = zeroth_order_scores(lm.model, blocks, groups, objective, batches, default, pool=pool); stop_s = time.perf_counter() - t
rel = max(abs(a - b) / max(abs(b), 1e-12) for g in fast for a, b in zip(fast[g], naive[g]))
mean = lambda v: sum(v) / len(v)
print(json.dumps({"groups": [g.name for g in groups], "samples_per_group": len(fast[groups[0].name]),
                  "batched_s": round(fast_s, 4), "naive_s": round(naive_s, 4), "speedup": round(naive_s / fast_s, 3),
                  "max_rel_diff": rel, "scores_batched": {g: mean(v) for g, v in fast.items()},
                  "scores_naive": {g: mean(v) for g, v in naive.items()},
                  "early_stop": {"rtol": default.rtol, "min_samples": default.min_samples, "s": round(stop_s, 4),
                                 "speedup_vs_naive": round(naive_s / stop_s, 3),
                                 "samples": {g: len(v) for g, v in stop.items()}, "pilot_draws": len(pool.pilot),
                                 "pooled_cv": pool.cv,
                                 "scores": {g: mean(v) for g, v in stop.items()},
                                 "max_rel_diff_vs_every_sample": max(abs(mean(stop[g]) - mean(v)) / max(abs(mean(v)), 1e-12)
                                                                     for g, v in fast.items())}}))
"""


def zeroth_order_timing(model: str, samples: int, seq_len: int, seed: int, blocks: str, rtol: str = "") -> dict:
    proc = subprocess.run([sys.executable, "-c", ZO_CODE, model, str(samples), str(seq_len), str(seed), blocks, rtol],
                          capture_output=True, text=True, env={**os.environ, "SPARSIFY_PROGRESS": "0"})
    if proc.returncode:
        raise SystemExit(f"zeroth-order timing failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


DEFAULT_VARIANTS = ("wanda:uniform,wanda:owl,wanda:ecoflap,wanda:ecoflap/score-samples=32@0.6+0.7,"
                    "wanda:ecoflap/max-sparsity=+0.2@0.6+0.7,sparsegpt:uniform@0.6+0.7,sparsegpt:ecoflap@0.6+0.7,"
                    "sparsegpt:ecoflap/max-sparsity=+0.2@0.6+0.7,"
                    "wanda:ecoflap/max-sparsity=+0.2/allocation-arg=weighted=true@0.6+0.7")


def parse_variant(text: str) -> dict:
    """``METHOD:ALLOCATION[/FLAG=VALUE...][@S+S...]`` -> {method, allocation, flags, sparsities or None, label}.

    ``max-sparsity=+0.2`` is relative to each target; ``@0.6+0.7`` runs the variant at those targets only.
    """
    head, _, only = text.partition("@")
    spec, *flags = head.split("/")
    method, _, allocation = spec.partition(":")
    return {"method": method, "allocation": allocation or "uniform", "label": head,
            "flags": [tuple(f.split("=", 1)) for f in flags],
            "sparsities": [float(x) for x in only.split("+")] if only else None}


def variant_flags(v: dict, s: float, scores_dir: Path) -> list[str]:
    """Variant ``v``'s prune flags at target ``s``; ECoFLaP variants with the same score samples share one scores file."""
    out = []
    for key, value in v["flags"]:
        out += [f"--{key}", str(round(s + float(value), 4)) if value.startswith("+") else value]
    if v["allocation"] == "ecoflap":
        out += ["--allocation-arg", f"scores_file={scores_dir / f'scores-{score_samples(v)}.json'}"]
    return out


def score_samples(v: dict) -> str:
    """What a variant's scores depend on: its score samples and any ``allocation-arg`` (e.g. weighted=true)."""
    flags = dict(v["flags"])
    extra = [value for key, value in v["flags"] if key == "allocation-arg"]
    return "-".join([flags.get("score-samples", "all"), *sorted(extra)])


def main() -> None:
    ap = protocol_parser(__doc__)
    ap.add_argument("--sparsities", default="0.5,0.6,0.7")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma list of METHOD:ALLOCATION[/FLAG=VALUE...][@S+S...] (see parse_variant)")
    ap.add_argument("--zo-blocks", default="0,10,20,29", help="block groups timed zeroth order ('' to skip)")
    ap.add_argument("--zo-samples", type=int, default=32, help="calibration sequences of the zeroth-order timing "
                                                                "(the reference scripts score 32; the early stop needs more than 8)")
    ap.add_argument("--zo-rtol", default="", help="early stop of the zeroth-order timing's last run (default: ZerothOrder's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out_json, calib, ev = protocol(args, "ecoflap")
    dense = sparsify("eval", args.model, *ev)["perplexity"]
    rows = []
    variants = [parse_variant(v) for v in args.variants.split(",") if v]  # "" runs only the timing
    result = {"model": args.model, "variants": [v["label"] for v in variants],
              "allocations": {"owl": {"m": 5.0, "lam": 0.08, "groups": "block"},
                              "ecoflap": {"score": "first", "group": "block", "aggregation": "sum",
                                          "max_sparsity": "target + 0.1 unless the variant says",
                                          "score_samples": "every calibration sequence unless the variant says"}},
              "calibration": {"source": "builtin", "samples": args.samples, "seq_len": args.seq_len, "seed": args.seed},
              "evaluation": {"data": "builtin eval split", "seq_len": args.seq_len, "windows": dense["windows"],
                             "tokens": dense["tokens"]},
              "dense_perplexity": dense["perplexity"], "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        for s in (float(x) for x in args.sparsities.split(",")):
            for v in variants:
                if v["sparsities"] is not None and not any(abs(s - x) < 1e-9 for x in v["sparsities"]):
                    continue
                out = Path(tmp) / f"run-{len(rows)}"
                m = sparsify("prune", args.model, "--method", v["method"], "--sparsity", str(s),
                             "--allocation", v["allocation"], "-o", str(out), *calib, *variant_flags(v, s, Path(tmp)))
                ppl = sparsify("eval", str(out), *ev, "--no-baseline")["perplexity"]["perplexity"]
                alloc = m.get("allocation") or {}
                groups = alloc.get("groups", {})
                rows.append({"sparsity_target": s, "method": v["method"], "allocation": v["allocation"],
                             "variant": v["label"], "score_samples": score_samples(v), "perplexity": ppl,
                             "global_sparsity": m["totals"]["sparsity"], "prune_s": m["timing"]["prune_s"],
                             "score_s": alloc.get("score_s"), "scores_reused": "scores_from" in alloc,
                             "max_sparsity": alloc.get("max_sparsity"), "peak_rss_mb": m["timing"]["peak_rss_mb"],
                             "block_sparsity": {b: round(g["sparsity"], 4) for b, g in groups.items()},
                             "block_score": {b: g["score"] for b, g in groups.items()}})
                print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("block")}), file=sys.stderr)
                compare(rows)
                write_results(out_json, result)  # each row survives a later failure
                shutil_rm(out)
    compare(rows)
    write_results(out_json, result)  # the rows survive a failure of the timing below
    if args.zo_blocks:
        result["zeroth_order_timing"] = zeroth_order_timing(args.model, args.zo_samples, args.seq_len, args.seed,
                                                            args.zo_blocks, args.zo_rtol)
        write_results(out_json, result)
    print(f"dense perplexity {dense['perplexity']:.2f}")
    print(f"{'target':>6} {'variant':<40} {'ppl':>9} {'vs uniform':>10} {'vs owl':>7} {'sparsity':>9} "
          f"{'prune s':>8} {'score s':>8} {'x wanda':>8}")
    for r in rows:
        print(f"{r['sparsity_target']:>6.2f} {r['variant']:<40} {r['perplexity']:>9.2f} "
              f"{r.get('ratio_vs_uniform', float('nan')):>10.3f} {r.get('ratio_vs_owl', float('nan')):>7.3f} "
              f"{r['global_sparsity']:>9.4f} {r['prune_s']:>8.1f} {r['score_s'] or 0:>8.1f} "
              f"{r.get('time_vs_uniform_wanda', float('nan')):>8.2f}")
    if "zeroth_order_timing" in result:
        z = result["zeroth_order_timing"]
        print(f"zeroth order, {len(z['groups'])} block groups x {z['samples_per_group']} sequences: batched+cached "
              f"{z['batched_s']:.1f} s, naive loop {z['naive_s']:.1f} s ({z['speedup']:.2f}x), max relative "
              f"difference {z['max_rel_diff']:.1e}; with early stop {z['early_stop']['s']:.1f} s")
    print(f"results -> {out_json}")


def compare(rows: list[dict]) -> None:
    """Ratios to the same method's uniform and OWL rows at the same target, and time against uniform Wanda's.

    A row whose ECoFLaP scores were read from an earlier row's file is also timed with that scoring
    added (``prune_with_scoring_s``): what a user pays running it alone.
    """
    scoring = {r["score_samples"]: r["score_s"] for r in rows if r["allocation"] == "ecoflap" and not r["scores_reused"]}
    for r in rows:
        if r["allocation"] == "ecoflap":
            r["prune_with_scoring_s"] = r["prune_s"] + (scoring.get(r["score_samples"], 0.0) if r["scores_reused"] else 0.0)
        same = [u for u in rows if u["sparsity_target"] == r["sparsity_target"]]
        for ref in ("uniform", "owl"):
            base = next((u for u in same if u["allocation"] == ref and u["method"] == r["method"]), None)
            if base:
                r[f"ratio_vs_{ref}"] = round(r["perplexity"] / base["perplexity"], 4)
        wanda = next((u for u in same if u["variant"] == "wanda:uniform"), None)
        if wanda:
            r["time_vs_uniform_wanda"] = round(r.get("prune_with_scoring_s", r["prune_s"]) / wanda["prune_s"], 3)
        r["sparsity_error"] = round(r["global_sparsity"] - r["sparsity_target"], 5)


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
