"""Block-sparse ViT speed on CPU: a ViT-B-shaped model packed as ``bsr`` against its dense source, through `sparsify bench`.

The model: ViTForImageClassification with ViT-B/16's shape (hidden 768, 12 blocks, 12 heads, MLP 3072,
224 x 224 images: 197 tokens, 1000 classes), random weights (seed 0), saved as safetensors. Speed does not
depend on the values, only on which tiles are kept. For each block sparsity, ``sparsify prune --method
magnitude --scheme block:16x16`` packs every linear layer of the blocks as ``bsr`` (the classifier and the
patch embedding stay dense), then ``sparsify bench`` times, in one process, interleaved:
- each layer shape against ``F.linear`` on its dense weight at 197 tokens (one image) and 6304 (32 images),
  with the CPU path the dispatch chose;
- whole forwards, images/s, at each ``--batch``, against the dense source model.
Prints a table and writes bench/results/vision_speed_vitb.json (machine, torch threads, each row).

    python bench/vision_speed.py                                   # the committed run
    python bench/vision_speed.py --sparsities 0.9 --batch 32 --reps 3 --out /tmp/v.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality import ROOT, sparsify, write_results  # noqa: E402  (bench scripts share the subprocess runner)

VIT_B = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
         "image_size": 224, "patch_size": 16, "num_labels": 1000}


def make_model(path: Path, shape: dict) -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(**shape)).eval().save_pretrained(path, safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", default="0.5,0.8,0.9")
    ap.add_argument("--block", default="16x16")
    ap.add_argument("--batch", default="1,32", help="comma list of forward batch sizes")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="a 2-block, hidden-256 model (a smoke run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out_json = Path(args.out or ROOT / "bench" / "results" / "vision_speed_vitb.json")
    shape = dict(VIT_B, **({"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "intermediate_size": 1024} if args.small else {}))
    tokens = (shape["image_size"] // shape["patch_size"]) ** 2 + 1
    batches = [int(b) for b in args.batch.split(",")]
    rows = []
    result = {"model": "ViTForImageClassification, random init (seed 0)", "shape": shape, "block": args.block,
              "method": "magnitude", "tokens_per_image": tokens, "reps": args.reps, "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "vit"
        make_model(model, shape)
        for s in (float(x) for x in args.sparsities.split(",")):
            out = Path(tmp) / f"bsr-{s}"
            m = sparsify("prune", model, "--method", "magnitude", "--scheme", f"block:{args.block}", "--sparsity",
                         str(s), "-o", out)
            flags = [f for b in batches for f in ("--batch", str(b))]
            b = sparsify("bench", out, "--tokens", str(tokens), "--tokens", str(tokens * max(batches)),
                         "--reps", str(args.reps), *flags)
            result["torch_threads"] = b["torch_threads"]
            forward = {r["batch"]: r for r in b["generation"]["rows"]}
            rows.append({"sparsity": s, "packed_bytes": m["totals"]["packed_bytes"],
                         "dense_bytes": m["totals"]["dense_bytes"],
                         "forward": [{"batch": k, "sparse_images_per_s": r["sparse_per_s"],
                                      "dense_images_per_s": r["dense_per_s"], "speedup": r["speedup"]["sparse"]}
                                     for k, r in sorted(forward.items())],
                         "layers": [{k: r[k] for k in ("shape", "tokens", "kernel", "sparse_ms", "dense_ms", "speedup")}
                                    for r in b["layers"]]})
            write_results(out_json, result)  # each row survives a later failure
            shutil.rmtree(out, ignore_errors=True)
    print(f"{'sparsity':>8} {'batch':>5} {'sparse img/s':>12} {'dense img/s':>11} {'speedup':>7}")
    for r in rows:
        for f in r["forward"]:
            print(f"{r['sparsity']:>8.2f} {f['batch']:>5} {f['sparse_images_per_s']:>12.2f} "
                  f"{f['dense_images_per_s']:>11.2f} {f['speedup']:>7.2f}")
    print(f"\n{'sparsity':>8} {'layer shape':>12} {'tokens':>6} {'kernel':>10} {'sparse ms':>9} {'dense ms':>8} {'x':>5}")
    for r in rows:
        for ly in r["layers"]:
            print(f"{r['sparsity']:>8.2f} {'x'.join(map(str, ly['shape'])):>12} {ly['tokens']:>6} {ly['kernel']:>10} "
                  f"{ly['sparse_ms']:>9.2f} {ly['dense_ms']:>8.2f} {ly['speedup']:>5.2f}")
    print(f"results -> {out_json}")


if __name__ == "__main__":
    main()
