"""How many zeroth-order draws ECoFLaP's allocation needs: perplexity of Wanda pruned with fewer and fewer draws.

A zeroth-order draw |L(W + eps z) - L(W - eps z)| / (2 eps) is half-normal around the group's gradient norm (a
coefficient of variation of 0.76), so a score of n draws has a relative standard error of about 0.76 / sqrt(n): 13% at
the 32 draws of the reference protocol, 27% at 8. The early stop (`rtol`, `sparsify/allocators/ecoflap_stop.py`) trades
that precision for time. This script measures what the trade costs: it draws every block group's values once
(SmolLM2-135M, the reference protocol's calibration set, 32 draws per group, no early stop, plus the first group's
pilot draws) and then, without drawing again, scores every group from

  - draws A..B-1 (``--draws`` items ``A:B``; ``N`` means ``0:N``), what ``--score-samples N --allocation-arg rtol=0``
    computes for ``0:N``; a later slice such as ``16:32`` is an independent set of the same size, a measure of how
    much the allocation moves with the draws alone;
  - the draws the early stop keeps at each ``--rtols`` value (`ecoflap_stop.planned_draws` on the drawn values, in
    the estimator's group order: exactly what ``--allocation-arg rtol=R`` draws);

writes each set of scores in the scores-file format, prunes with uniform Wanda and with ECoFLaP(Wanda) reading them
(``--allocation-arg scores_file=...``, S_max = S + ``--max-offset``) at each target, and evaluates held-out
perplexity. Each row also has the draws it used (``draw_fraction``: of every draw, pilot included). What the draws cost
in time, and how that compares with the naive loop, is bench/ecoflap.py's zeroth-order timing, on a quiet machine.

    python bench/ecoflap_draws.py                 # the committed run (bench/results/ecoflap_draws_smollm2.json)
    python bench/ecoflap_draws.py --values /tmp/v.json   # reuse (or write) the drawn values
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import print_table, protocol, protocol_parser, sparsify, write_results  # noqa: E402


def _setup(args):
    from sparsify.allocators.ecoflap_scores import Group
    from sparsify.calibrate.batches import calibration_batches
    from sparsify.config import CalibConfig
    from sparsify.models.layout import find_blocks, find_targets
    from sparsify.models.load import load_model, resolve

    lm = load_model(resolve(args.model), dtype="float32")
    batches = calibration_batches(lm, CalibConfig(source="builtin", samples=args.samples, seq_len=args.seq_len,
                                                  seed=args.seed, batch_size=8))
    groups = [Group(name, {n: lm.model.get_submodule(n) for n in names}, name.rpartition(".")[0],
                    int(name.rpartition(".")[2])) for name, names in find_targets(lm.model).items()]
    return lm, batches, find_blocks(lm.model), groups


def draw_values(args, drawn: dict | None) -> dict:
    """{"values": {group: [draws]}, "draws", "seed", "pilot": [the first group's pilot draws]}, no early stop.

    ``drawn`` (an earlier file without the pilot) keeps its values; only the pilot is drawn then.
    """
    import torch

    from sparsify.allocators.ecoflap_loss import objective_for
    from sparsify.allocators.ecoflap_scores import ZerothOrder, in_scoring_order, zeroth_order_scores
    from sparsify.allocators.ecoflap_stop import Pool

    lm, batches, blocks, groups = _setup(args)
    objective = objective_for(lm.family.name)
    with torch.inference_mode():
        if drawn is None:
            settings = ZerothOrder(samples=args.max_draws, rtol=0.0, seed=args.seed)
            drawn = {"values": zeroth_order_scores(lm.model, blocks, groups, objective, batches, settings),
                     "draws": args.max_draws, "seed": args.seed}
        first = in_scoring_order(groups)[0]
        pool = Pool()  # the pilot is what any rtol that stops early draws first: min_samples draws after the last
        zeroth_order_scores(lm.model, blocks, [first], objective, batches,
                            ZerothOrder(samples=drawn["draws"], rtol=0.5, seed=drawn["seed"]), pool=pool)
    return {**drawn, "pilot": pool.pilot, "pilot_group": first.name}


def planned(drawn: dict, rtol: float, min_samples: int = 8) -> tuple[dict[str, list[float]], int]:
    """What ``--allocation-arg rtol=R`` would draw, replayed on the drawn values (in the estimator's group order:
    blocks in order), and how many pilot draws it took."""
    from sparsify.allocators.ecoflap_stop import Pool, planned_draws

    pool, out = Pool(), {}
    for g, values in drawn["values"].items():
        stored = values + (drawn["pilot"] if g == drawn["pilot_group"] else [])  # the pilot's indices follow the draws'
        out[g] = planned_draws(lambda samples, v=stored: [v[s] for s in samples], pool, rtol, min_samples,
                               drawn["draws"])
    return out, len(pool.pilot)


def rules(drawn: dict, draws: list[str], rtols: list[float]) -> list[tuple[str, dict, dict[str, list[float]], int]]:
    """(label, ECoFLaP options that would compute these scores, {group: the draws used}, pilot draws)."""
    values, out = drawn["values"], []
    for item in draws:
        a, _, b = item.rpartition(":")
        a, b = int(a or 0), int(b)
        out.append((f"draws={item}", {"score_samples": b, "rtol": 0.0}, {g: v[a:b] for g, v in values.items()}, 0))
    for r in rtols:
        used, pilot = planned(drawn, r)
        out.append((f"rtol={r}", {"score_samples": drawn["draws"], "rtol": r}, used, pilot))
    return out


def main() -> None:
    ap = protocol_parser(__doc__)
    ap.add_argument("--sparsities", default="0.6,0.7")
    ap.add_argument("--draws", default="16,16:32,32", help="comma list of N (the first N draws) or A:B")
    ap.add_argument("--rtols", default="0.15,0.2")
    ap.add_argument("--max-draws", type=int, default=32)
    ap.add_argument("--max-offset", type=float, default=0.2, help="S_max = target + this")
    ap.add_argument("--values", default=None, help="JSON of drawn values: read when it exists, else written")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out_json, calib, ev = protocol(args, "ecoflap_draws")
    from sparsify.allocators.ecoflap import ECoFLaPConfig, scores_key

    drawn = json.loads(Path(args.values).read_text()) if args.values and Path(args.values).is_file() else None
    if drawn is None or "pilot" not in drawn:
        drawn = draw_values(args, drawn)
        if args.values:
            Path(args.values).write_text(json.dumps(drawn))
    every = sum(len(v) for v in drawn["values"].values()) + len(drawn["pilot"])
    dense = sparsify("eval", args.model, *ev)["perplexity"]
    rows = []
    result = {"model": args.model, "calibration": {"source": "builtin", "samples": args.samples,
                                                   "seq_len": args.seq_len, "seed": args.seed},
              "evaluation": {"seq_len": args.seq_len, "windows": dense["windows"], "tokens": dense["tokens"]},
              "dense_perplexity": dense["perplexity"], "max_offset": args.max_offset, "drawn": drawn, "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        for s in (float(x) for x in args.sparsities.split(",")):
            out = Path(tmp) / f"uniform-{s}"
            m = sparsify("prune", args.model, "--method", "wanda", "--sparsity", str(s), "-o", str(out), *calib)
            uniform = sparsify("eval", str(out), *ev, "--no-baseline")["perplexity"]["perplexity"]
            shutil.rmtree(out)
            rows.append({"sparsity_target": s, "rule": "uniform", "perplexity": uniform, "ratio_vs_uniform": 1.0,
                         "global_sparsity": m["totals"]["sparsity"]})
            for label, options, used, pilot in rules(drawn, args.draws.split(","),
                                              [float(x) for x in args.rtols.split(",") if x]):
                config = ECoFLaPConfig(score="zeroth", seed=args.seed, **options)
                scores = Path(tmp) / f"scores-{label}.json"
                scores.write_text(json.dumps({"key": scores_key(config),
                                              "scores": {g: sum(v) / len(v) for g, v in used.items()}}))
                out = Path(tmp) / f"{label}-{s}"
                m = sparsify("prune", args.model, "--method", "wanda", "--sparsity", str(s), "--allocation", "ecoflap",
                             "--score", "zeroth", "--score-samples", str(options["score_samples"]),
                             "--allocation-arg", f"rtol={options['rtol']}", "--allocation-arg", f"seed={args.seed}",
                             "--allocation-arg", f"scores_file={scores}",
                             "--max-sparsity", str(round(s + args.max_offset, 4)), "-o", str(out), *calib)
                ppl = sparsify("eval", str(out), *ev, "--no-baseline")["perplexity"]["perplexity"]
                shutil.rmtree(out)
                n = sum(len(v) for v in used.values()) + pilot
                rows.append({"sparsity_target": s, "rule": label, "perplexity": ppl,
                             "ratio_vs_uniform": round(ppl / uniform, 4), "global_sparsity": m["totals"]["sparsity"],
                             "draws": n, "draws_per_group": round(n / len(used), 2),
                             "draw_fraction": round(n / every, 4),
                             "block_sparsity": {g: round(v["sparsity"], 4) for g, v in m["allocation"]["groups"].items()}})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "block_sparsity"}), file=sys.stderr)
                write_results(out_json, result)
    write_results(out_json, result)
    for r in rows:
        r.setdefault("draws_per_group", float("nan"))
        r.setdefault("draw_fraction", float("nan"))
    print(f"dense perplexity {dense['perplexity']:.2f}; {every} draws in all")
    print_table(rows, [("target", "sparsity_target", 6, ".2f"), ("rule", "rule", 10, ""), ("ppl", "perplexity", 9, ".2f"),
                       ("vs uniform", "ratio_vs_uniform", 10, ".3f"), ("draws/group", "draws_per_group", 11, ".1f"),
                       ("of all", "draw_fraction", 6, ".2f")])
    print(f"results -> {out_json}")


if __name__ == "__main__":
    main()
