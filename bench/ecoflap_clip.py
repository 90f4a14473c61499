"""ECoFLaP on CLIP: uniform Wanda against ECoFLaP(Wanda) variants, zero-shot accuracy of several digits CLIPs.

The models are the tests' digits CLIP (tests/trained_models.py: CLIPModel with two 2-block towers, hidden 64, trained
in-process on scikit-learn's handwritten digits with captions such as "a photo of the digit seven"), trained once per
seed (``--seeds N``: seeds 0..N-1 draw the initial weights, the batch order and the captions' templates; the 360
held-out images are the same for every seed and never seen in training). One trained model is too few to compare
allocators on: a single held-out image is 0.28 points, and retraining the same recipe on another CPU moved the
comparison by several points. So every configuration runs on every seed, and the summary gives, per target and
configuration, the mean over the seeds of its top-1 minus uniform Wanda's on the same model (a paired difference),
its standard error over the seeds, and the wins / ties / losses.

Per seed: calibration on ``--samples`` training digits with captions (templates drawn with the seed, a captions.txt
folder, `write_caption_folder`), batches of ``--batch-size`` (ECoFLaP's contrastive loss scores one batch per unit).
For each target sparsity, unstructured, every configuration (``SEEDED_CONFIGS`` by default, any of ``CONFIGS``) is its
own `sparsify prune` process, then `sparsify eval --task zero-shot` on the held-out digits against the 10 captions
"a photo of the digit {word}". ECoFLaP's scores do not depend on the sparsity: each variant's first run writes them
to a scores file and the later sparsities read it (``scores_reused``). Every row has the realised global sparsity
counted from the packed weights (per-row rounding down: a group at 44.7% keeps int(64 x 0.553) weights of a 64-wide
row) and its difference to uniform's, the prune wall time, the scoring time and the per-group sparsities and scores.
Prints the summary and writes bench/results/ecoflap_clip_digits.json.

    python bench/ecoflap_clip.py                           # the committed run (needs scikit-learn: the dev extra)
    python bench/ecoflap_clip.py --seeds 2 --sparsities 0.7 --configs uniform,ecoflap --out /tmp/c.json
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from quality import ROOT, print_table, sparsify, write_results  # noqa: E402  (bench scripts share the subprocess runner)
from trained_models import (DIGIT_WORDS, ZERO_SHOT_TEMPLATE, trained_clip_dir, write_caption_folder,  # noqa: E402
                            write_digit_folder)

CONFIGS = {"uniform": ["--allocation", "uniform"], "owl": ["--allocation", "owl"],
           "ecoflap": ["--allocation", "ecoflap"],
           "ecoflap-per-tower": ["--allocation", "ecoflap", "--per-tower"],
           "ecoflap-tower": ["--allocation", "ecoflap", "--group", "tower"],
           "ecoflap-matrix": ["--allocation", "ecoflap", "--group", "matrix"],
           "ecoflap-weighted": ["--allocation", "ecoflap", "--allocation-arg", "weighted=true"],
           "ecoflap-matrix-weighted": ["--allocation", "ecoflap", "--group", "matrix", "--allocation-arg", "weighted=true"],
           "ecoflap-l2": ["--allocation", "ecoflap", "--allocation-arg", "norm=l2"],
           "ecoflap-matrix-l2": ["--allocation", "ecoflap", "--group", "matrix", "--allocation-arg", "norm=l2"],
           "ecoflap-zeroth": ["--allocation", "ecoflap", "--score", "zeroth"]}
SEEDED_CONFIGS = ("uniform", "ecoflap", "ecoflap-matrix-weighted", "ecoflap-zeroth")


def run_seed(seed: int, args, tmp: Path) -> tuple[dict, dict, list[dict]]:
    """(training record, dense zero-shot, one row per (sparsity, config)) of the CLIP trained with ``seed``."""
    model = trained_clip_dir(seed=seed)
    record = json.loads((model / "trained.json").read_text())
    work = tmp / f"seed{seed}"
    digits = write_digit_folder(work / "digits", names=list(DIGIT_WORDS))
    calib = write_caption_folder(work / "calib", args.samples, seed=seed)
    ev = ["--task", "zero-shot", "--data", str(digits), "--template", ZERO_SHOT_TEMPLATE]
    dense = sparsify("eval", str(model), *ev)["zero-shot"]
    rows = []
    for s in (float(x) for x in args.sparsities.split(",")):
        for name in args.configs.split(","):
            out = work / f"{name}-{s}"
            extra = (["--allocation-arg", f"scores_file={work / f'scores-{name}.json'}"]
                     if name.startswith("ecoflap") else [])
            m = sparsify("prune", str(model), "--method", args.method, "--sparsity", str(s), *CONFIGS[name],
                         *extra, "--calib", str(calib), "--samples", str(args.samples), "--batch-size",
                         str(args.batch_size), "-o", str(out))
            z = sparsify("eval", str(out), *ev, "--no-baseline")["zero-shot"]
            alloc = m.get("allocation") or {}
            groups = alloc.get("groups", {})
            rows.append({"seed": seed, "sparsity_target": s, "config": name, "args": CONFIGS[name],
                         "top1": z["top1"], "top5": z["top5"], "global_sparsity": m["totals"]["sparsity"],
                         "prune_s": m["timing"]["prune_s"], "score_s": alloc.get("score_s") or 0.0,
                         "scores_reused": "scores_from" in alloc,
                         "group_sparsity": {g: round(v["sparsity"], 4) for g, v in groups.items()},
                         "group_score": {g: v.get("score") for g, v in groups.items()}})
            print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("group")}), file=sys.stderr)
            shutil.rmtree(out)
    for r in rows:
        base = next(u for u in rows if u["sparsity_target"] == r["sparsity_target"] and u["config"] == "uniform")
        r["top1_minus_uniform"] = round(r["top1"] - base["top1"], 4)
        r["sparsity_minus_uniform"] = round(r["global_sparsity"] - base["global_sparsity"], 5)
        r["time_vs_uniform"] = round(r["prune_s"] / base["prune_s"], 3)
    return record, dense, rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (sparsity, config): mean top-1 over the seeds, and the paired difference to uniform with its
    standard error over the seeds (each seed is its own trained model and calibration draw)."""
    out = []
    for key in dict.fromkeys((r["sparsity_target"], r["config"]) for r in rows):
        d = [r["top1_minus_uniform"] for r in rows if (r["sparsity_target"], r["config"]) == key]
        top1 = [r["top1"] for r in rows if (r["sparsity_target"], r["config"]) == key]
        n = len(d)
        mean = sum(d) / n
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
        out.append({"sparsity_target": key[0], "config": key[1], "seeds": n, "top1_mean": round(sum(top1) / n, 4),
                    "minus_uniform_mean": round(mean, 4), "minus_uniform_se": round(se, 4),
                    "wins": sum(x > 0 for x in d), "ties": sum(x == 0 for x in d), "losses": sum(x < 0 for x in d)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", default="0.5,0.6,0.7")
    ap.add_argument("--configs", default=",".join(SEEDED_CONFIGS))
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=6, help="independently trained CLIPs (seeds 0..N-1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.configs.split(",")[0] != "uniform":
        raise SystemExit("--configs must start with uniform (every row is compared with it)")
    out_json = Path(args.out or ROOT / "bench" / "results" / "ecoflap_clip_digits.json")
    rows, models = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            record, dense, seed_rows = run_seed(seed, args, Path(tmp))
            models.append({"seed": seed, "dense_top1": dense["top1"], "training": record})
            rows += seed_rows
    summary = summarize(rows)
    result = {"model": "tests/trained_models.py digits CLIP, one per seed", "models": models,
              "method": args.method, "scheme": "unstructured",
              "calibration": {"source": "training digits with captions", "samples": args.samples,
                              "batch_size": args.batch_size, "seed": "the model's seed"},
              "evaluation": {"data": "held-out digits", "images": dense["images"], "template": ZERO_SHOT_TEMPLATE},
              "summary": summary, "rows": rows}
    write_results(out_json, result)
    dense_top1 = ", ".join(f"{m['dense_top1']:.3f}" for m in models)
    print(f"dense zero-shot top-1 {dense_top1} "
          f"on {dense['images']} held-out digits ({args.seeds} trained CLIPs)")
    print_table(summary, [("target", "sparsity_target", 6, ".2f"), ("config", "config", 23, ""),
                          ("top-1", "top1_mean", 6, ".3f"), ("- uniform", "minus_uniform_mean", 9, ".4f"),
                          ("se", "minus_uniform_se", 6, ".4f"), ("wins", "wins", 4, "d"),
                          ("ties", "ties", 4, "d"), ("losses", "losses", 6, "d")])
    print(f"results -> {out_json}")


if __name__ == "__main__":
    main()
