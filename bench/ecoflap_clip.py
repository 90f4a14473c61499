"""ECoFLaP on CLIP: uniform Wanda, OWL + Wanda and ECoFLaP(Wanda) variants, zero-shot accuracy of the digits CLIP.

The model is the tests' digits CLIP (tests/trained_models.py: CLIPModel with two 2-block towers, hidden 64, trained
in-process on scikit-learn's handwritten digits with captions such as "a photo of the digit seven"; its 360 held-out
images are never seen in training). Calibration: ``--samples`` training digits with captions (seeded templates, a
captions.txt folder, `write_caption_folder`), batches of ``--batch-size`` (ECoFLaP's contrastive loss scores one batch
per unit). For each target sparsity, unstructured, every configuration is its own `sparsify prune` process, then
`sparsify eval --task zero-shot` on the held-out digits against the 10 captions "a photo of the digit {word}":

- uniform Wanda; OWL + Wanda (M = 5, lambda = 0.08, per block);
- ECoFLaP + Wanda: first-order scores, S_max = S + 0.1, groups ``block`` (default), ``block --per-tower`` (each tower
  keeps its own budget), ``tower`` (one group per tower) and ``matrix``; ``block`` and ``matrix`` with |G * W|
  scores (``weighted=true``), and with ||G||_2 scores (``norm=l2``); ``block`` with zeroth-order scores
  (``--score zeroth``).

ECoFLaP's scores do not depend on the sparsity: each variant's first run writes them to a scores file and the later
sparsities read it (``scores_reused``), so a variant's first row's prune time is the whole cost. Every row has the
realised global sparsity counted from the packed weights (per-row rounding down: a group at 44.7% keeps
int(64 x 0.553) weights of a 64-wide row), the prune wall time of the process, the scoring time and the per-group
sparsity. Prints a table and writes bench/results/ecoflap_clip_digits.json.

    python bench/ecoflap_clip.py                           # the committed run (needs scikit-learn: the dev extra)
    python bench/ecoflap_clip.py --sparsities 0.7 --configs uniform,ecoflap --out /tmp/c.json
"""
from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", default="0.5,0.6,0.7")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out_json = Path(args.out or ROOT / "bench" / "results" / "ecoflap_clip_digits.json")
    model = trained_clip_dir()
    record = json.loads((model / "trained.json").read_text())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        digits = write_digit_folder(Path(tmp) / "digits", names=list(DIGIT_WORDS))
        calib = write_caption_folder(Path(tmp) / "calib", args.samples)
        ev = ["--task", "zero-shot", "--data", str(digits), "--template", ZERO_SHOT_TEMPLATE]
        dense = sparsify("eval", str(model), *ev)["zero-shot"]
        for s in (float(x) for x in args.sparsities.split(",")):
            for name in args.configs.split(","):
                out = Path(tmp) / f"{name}-{s}"
                extra = (["--allocation-arg", f"scores_file={Path(tmp) / f'scores-{name}.json'}"]
                         if name.startswith("ecoflap") else [])
                m = sparsify("prune", str(model), "--method", args.method, "--sparsity", str(s), *CONFIGS[name],
                             *extra, "--calib", str(calib), "--samples", str(args.samples), "--batch-size",
                             str(args.batch_size), "-o", str(out))
                z = sparsify("eval", str(out), *ev, "--no-baseline")["zero-shot"]
                alloc = m.get("allocation") or {}
                groups = alloc.get("groups", {})
                rows.append({"sparsity_target": s, "config": name, "args": CONFIGS[name], "top1": z["top1"],
                             "top5": z["top5"], "global_sparsity": m["totals"]["sparsity"],
                             "prune_s": m["timing"]["prune_s"], "score_s": alloc.get("score_s"),
                             "scores_reused": "scores_from" in alloc,
                             "group_sparsity": {g: round(v["sparsity"], 4) for g, v in groups.items()},
                             "group_score": {g: v.get("score") for g, v in groups.items()}})
                print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("group")}), file=sys.stderr)
    for r in rows:
        base = next((u for u in rows if u["sparsity_target"] == r["sparsity_target"] and u["config"] == "uniform"), None)
        r["top1_minus_uniform"] = round(r["top1"] - base["top1"], 4) if base else float("nan")
        r["time_vs_uniform"] = round(r["prune_s"] / base["prune_s"], 3) if base else float("nan")
        r["score_s"] = r["score_s"] if r["score_s"] is not None else 0.0
    result = {"model": "tests/trained_models.py digits CLIP", "training": record, "dense": dense,
              "method": args.method, "scheme": "unstructured",
              "calibration": {"source": "training digits with captions", "samples": args.samples,
                              "batch_size": args.batch_size, "seed": 0},
              "evaluation": {"data": "held-out digits", "images": dense["images"], "template": ZERO_SHOT_TEMPLATE},
              "rows": rows}
    write_results(out_json, result)
    print(f"dense zero-shot top-1 {dense['top1']:.3f} on {dense['images']} held-out digits")
    print_table(rows, [("target", "sparsity_target", 6, ".2f"), ("config", "config", 23, ""),
                       ("top-1", "top1", 6, ".3f"), ("vs uniform", "top1_minus_uniform", 10, ".3f"),
                       ("sparsity", "global_sparsity", 8, ".4f"), ("prune s", "prune_s", 7, ".1f"),
                       ("score s", "score_s", 7, ".2f")])
    print(f"results -> {out_json}")


if __name__ == "__main__":
    main()
