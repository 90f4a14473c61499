"""Vision benchmark: block pruning of the digits ViT, uniform against LPViT, held-out top-1.

The model is the tests' digits ViT (tests/trained_models.py: a 2-block ViT trained in-process on
scikit-learn's handwritten digits, upscaled to 32 x 32; its held-out split, 360 images, is never seen
in training). Each configuration is a `sparsify prune` process (16 x 16 blocks, 64 calibration images,
seed 0) followed by `sparsify eval --task accuracy` on the held-out digits. Calibration is in-domain
by default, as a user with the training data would do it: ``--calib train`` draws from the digits'
training split (never the held-out one); ``--calib builtin`` uses the built-in photos instead.
Configurations: uniform block magnitude / Wanda and LPViT with each, at 30% and 50% sparsity, plus
LPViT without its hardware cost term (``beta=0``); then the GPUSQ-ViT scheme post-training: 2:4
SparseGPT with int8 (per channel) and int4 (groups of 32) jointly, each without and with a short
distillation (``--distill-steps``, dense teacher, mask frozen), the latter quantized after distilling
(the default) and on the pruner's fixed grid (``--distill-quant fixed``). Every row has its artifact's bytes.
Prints a table and writes bench/results/vision_digits_vit.json.

    python bench/vision.py                      # the committed run (needs scikit-learn: the dev extra)
    python bench/vision.py --sparsities 0.5 --out /tmp/v.json
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
from trained_models import trained_vit_dir, write_digit_folder  # noqa: E402  (the tests' trained ViT)

BLOCK_RUNS = [("uniform", "magnitude", []), ("uniform", "wanda", []), ("lpvit", "magnitude", []),
              ("lpvit", "wanda", []), ("lpvit", "magnitude", ["--allocation-arg", "beta=0"]),
              ("lpvit", "wanda", ["--allocation-arg", "beta=0"])]
NM_QUANT = [["--quant", "int8"], ["--quant", "int4", "--group-size", "32"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", default="0.3,0.5")
    ap.add_argument("--block", default="16x16")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--calib", default="train", help="train (the digits' training split) | builtin (photos)")
    ap.add_argument("--distill-steps", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out_json = Path(args.out or ROOT / "bench" / "results" / "vision_digits_vit.json")
    model = trained_vit_dir()
    record = json.loads((model / "trained.json").read_text())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        digits = write_digit_folder(Path(tmp) / "digits")
        calib = str(write_digit_folder(Path(tmp) / "train", split="train")) if args.calib == "train" else "builtin"
        dense = sparsify("eval", str(model), "--task", "accuracy", "--data", str(digits))["accuracy"]
        def run(label: dict, prune_args: list[str]) -> None:
            out = Path(tmp) / f"run{len(rows)}"
            m = sparsify("prune", str(model), *prune_args, "-o", str(out), "--samples", str(args.samples),
                         "--batch-size", "8", "--calib", calib)
            a = sparsify("eval", str(out), "--task", "accuracy", "--data", str(digits), "--no-baseline")["accuracy"]
            rows.append({**label, "args": prune_args, "top1": a["top1"], "top5": a["top5"],
                         "global_sparsity": m["totals"]["sparsity"], "packed_bytes": m["totals"]["packed_bytes"],
                         "dense_bytes": m["totals"]["dense_bytes"], "bytes_ratio": m["totals"]["ratio"],
                         "layer_sparsity": {e["module"]: round(e["sparsity"], 4) for e in m["tensors"].values()}})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "layer_sparsity"}), file=sys.stderr)

        for s in (float(x) for x in args.sparsities.split(",")):
            for allocation, method, extra in BLOCK_RUNS:
                run({"config": f"block {allocation} {method}" + (" beta=0" if extra else ""), "sparsity_target": s},
                    ["--method", method, "--scheme", f"block:{args.block}", "--sparsity", str(s),
                     "--allocation", allocation, *extra])
        for quant in NM_QUANT:
            for steps, when in ((0, []), (args.distill_steps, []), (args.distill_steps, ["--distill-quant", "fixed"])):
                run({"config": f"2:4 sparsegpt {' '.join(quant[1::2])} distill {steps}" + (" fixed grid" if when else ""),
                     "sparsity_target": 0.5},
                    ["--method", "sparsegpt", "--scheme", "2:4", *quant, "--distill-steps", str(steps), *when])
    result = {"model": "tests/trained_models.py digits ViT", "training": record, "dense": dense,
              "block": args.block, "calibration": {"source": "digits training split" if args.calib == "train" else "builtin photos",
                              "samples": args.samples, "seed": 0},
              "evaluation": {"data": "held-out digits", "images": dense["images"]}, "rows": rows}
    write_results(out_json, result)
    print(f"dense top-1 {dense['top1']:.3f} on {dense['images']} held-out digits")
    print_table(rows, [("config", "config", 44, ""), ("target", "sparsity_target", 6, ".2f"), ("top-1", "top1", 7, ".3f"),
                       ("sparsity", "global_sparsity", 9, ".4f"), ("bytes", "bytes_ratio", 6, ".3f")])
    print(f"results -> {out_json}")


if __name__ == "__main__":
    main()
