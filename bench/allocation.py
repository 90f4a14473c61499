"""Allocation benchmark: OWL + Wanda against uniform Wanda on SmolLM2-135M, held-out perplexity.

Same protocol as bench/quality.py (built-in encyclopedia text: 64 x 512 calibration tokens, 32 x 512
held-out tokens that never overlap them, fp32 on CPU). For each target sparsity, one uniform Wanda run
and one ``--allocation owl`` run (M = 5, lambda = 0.08, per block); each as its own process. Reports
perplexity, the ratio OWL / uniform, the realised global sparsity (counted from the packed weights'
non-zeros, over every pruned layer) and the per-block sparsities OWL chose. Prints a table and
writes bench/results/allocation_<model>.json.

    python bench/allocation.py                                  # the committed run
    python bench/allocation.py --model DIR --samples 4 --seq-len 64 --windows 2 --sparsities 0.6 --out /tmp/a.json
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import print_table, protocol, protocol_parser, sparsify, write_results  # noqa: E402  (bench scripts share the subprocess runner)


def main() -> None:
    ap = protocol_parser(__doc__)
    ap.add_argument("--sparsities", default="0.6,0.7")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out_json, calib, ev = protocol(args, "allocation")
    dense = sparsify("eval", args.model, *ev)["perplexity"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in (float(x) for x in args.sparsities.split(",")):
            for allocation in ("uniform", "owl"):
                out = Path(tmp) / f"{allocation}-{s}"
                m = sparsify("prune", args.model, "--method", "wanda", "--sparsity", str(s),
                             "--allocation", allocation, "-o", str(out), *calib)
                ppl = sparsify("eval", str(out), *ev, "--no-baseline")["perplexity"]["perplexity"]
                alloc = m.get("allocation") or {}
                rows.append({"sparsity_target": s, "allocation": allocation, "perplexity": ppl,
                             "global_sparsity": m["totals"]["sparsity"], "prune_s": m["timing"]["prune_s"],
                             "peak_rss_mb": m["timing"]["peak_rss_mb"],
                             "block_sparsity": {b: round(g["sparsity"], 4) for b, g in alloc.get("groups", {}).items()},
                             "block_outlier_ratio": {b: g["score"] for b, g in alloc.get("groups", {}).items()}})
                print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("block")}), file=sys.stderr)
    for r in rows:
        base = next(u for u in rows if u["sparsity_target"] == r["sparsity_target"] and u["allocation"] == "uniform")
        r["ratio_vs_uniform"] = round(r["perplexity"] / base["perplexity"], 4)
        r["sparsity_error"] = round(r["global_sparsity"] - r["sparsity_target"], 5)
    result = {"model": args.model, "method": "wanda", "owl": {"m": 5.0, "lam": 0.08, "groups": "block"},
              "calibration": {"source": "builtin", "samples": args.samples, "seq_len": args.seq_len, "seed": args.seed},
              "evaluation": {"data": "builtin eval split", "seq_len": args.seq_len, "windows": dense["windows"],
                             "tokens": dense["tokens"]},
              "dense_perplexity": dense["perplexity"], "rows": rows}
    write_results(out_json, result)
    print(f"dense perplexity {dense['perplexity']:.2f}")
    print_table(rows, [("target", "sparsity_target", 6, ".2f"), ("allocation", "allocation", 10, ""),
                       ("ppl", "perplexity", 9, ".2f"), ("vs uniform", "ratio_vs_uniform", 10, ".3f"),
                       ("global sparsity", "global_sparsity", 16, ".4f"), ("prune s", "prune_s", 8, ".1f")])
    print(f"results -> {out_json}")


if __name__ == "__main__":
    main()
