"""Double Sparsity benchmark: perplexity and passkey retrieval of SmolLM2-135M at 2048 context, per
sparsity level and channel statistic, against dense attention.

In one process (the channel statistics are calibrated once and every configuration reuses them,
where `sparsify prune --attention double-sparsity` would calibrate again per artifact): calibrate
per-kv-head |q_c k_c|, |q_c|, |k_c| on the built-in calibration text, let ``auto`` pick its statistic
at 1/16 on held-out calibration windows, then for each level and statistic install the sparse
attention on the dense model and measure held-out perplexity with the decode simulation (every
query position attends to its own top-k of its causal prefix), and passkey accuracy for the
configurations named by ``--passkey``. Levels follow METHODS.md: token sparsity k / context and
label sparsity r * bits / (d * 16), both equal to the level; `LEVELS` states (k, r, bits). KV bytes
read per decoded token are the analytic count of `sparsify.attention.accounting` (fp16 cache).
Prints a table and writes bench/results/double_sparsity_<model>.json.

    python bench/double_sparsity.py                       # the committed run
    python bench/double_sparsity.py --model DIR --samples 2 --seq-len 32 --context 64 --windows 1 --trials 1 \\
        --levels 1/4 --statistics qk --passkey 1/4:qk --out /tmp/ds.json
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import ROOT, print_table, protocol_parser, write_results  # noqa: E402

# level -> (token fraction k / context, channel fraction r / d, label bits): both sparsities equal the level
LEVELS = {"1/4": (1 / 4, 1 / 4, 16), "1/8": (1 / 8, 1 / 4, 8), "1/16": (1 / 16, 1 / 4, 4), "1/32": (1 / 32, 1 / 8, 4)}


def ds_config(level: str, statistic: str, args):
    from sparsify.attention.double_sparsity import DoubleSparsityConfig

    tokens, channels, bits = LEVELS[level]
    k = max(args.sink + args.recent + 1, round(tokens * args.context))
    return DoubleSparsityConfig(channels=channels, tokens=k, label_bits=bits, statistic=statistic, sink=args.sink,
                                recent=args.recent, dense_layers=args.dense_layers, select=args.select,
                                label_scale=args.label_scale)


def main() -> None:
    ap = protocol_parser(__doc__)
    ap.set_defaults(samples=16, windows=2)
    ap.add_argument("--context", type=int, default=2048, help="evaluation context (windows, passkey prompts)")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--levels", default="1/4,1/8,1/16,1/32")
    ap.add_argument("--statistics", default="qk,q,k,random")
    ap.add_argument("--passkey", default="dense,1/16:auto", help="passkey runs: dense, LEVEL:STAT")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--recent", type=int, default=32)
    ap.add_argument("--dense-layers", type=int, default=2)
    ap.add_argument("--select", default="max", help="max | union | sum | head (ds_runtime.select_tokens)")
    ap.add_argument("--label-scale", default="channel", help="channel | token: the grid of 4 / 8-bit labels")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded 2-core machine)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("SPARSIFY_PROGRESS", "0")
    import torch

    torch.set_num_threads(args.threads)
    from sparsify.attention import ds_runtime
    from sparsify.attention.accounting import kv_bytes
    from sparsify.attention.double_sparsity import collect_stats, label_ranges, rankings
    from sparsify.attention.ds_select import choose
    from sparsify.calibrate.batches import build_batches
    from sparsify.calibrate.data import eval_windows, load_text
    from sparsify.config import CalibConfig
    from sparsify.eval.passkey import passkey
    from sparsify.eval.perplexity import perplexity
    from sparsify.models.load import load_model, resolve

    name = Path(args.model).name.replace("-135m", "")
    out_json = Path(args.out or ROOT / "bench" / "results" / f"double_sparsity_{name}.json")
    t_all = time.perf_counter()
    lm = load_model(resolve(args.model))
    cfg = lm.model.config
    shape = {"blocks": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
             "kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
             "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads}
    calib = CalibConfig(samples=args.samples, seq_len=args.seq_len, seed=args.seed, batch_size=4)
    t = time.perf_counter()
    stats = collect_stats(lm.model, build_batches("text", calib, tokenizer=lm.tokenizer))
    calib_s = time.perf_counter() - t
    t = time.perf_counter()
    chosen, selection = choose(lm, stats, ds_config("1/16", "auto", args), calib,
                               args.seq_len)
    select_s = time.perf_counter() - t
    print(f"calibration {calib_s:.0f} s; auto picked {chosen} in {select_s:.0f} s: {selection['losses']}",
          file=sys.stderr)
    windows = eval_windows(lm.tokenizer, load_text("builtin", "eval"), args.context, args.windows)
    ranked = {s: rankings(stats, s, args.seed) for s in ("qk", "q", "k", "random")}
    ranked["auto"] = ranked[chosen]
    ranges = label_ranges(stats)
    passkey_runs = set(args.passkey.split(",")) if args.passkey else set()
    rows = []

    def measure(level: str | None, statistic: str | None) -> dict:
        ds_runtime.uninstall(lm.model)
        row = {"level": level or "dense", "statistic": statistic or "-"}
        if level is not None:
            c = ds_config(level, statistic, args)
            ds_runtime.install(lm.model, ranked[statistic], c, ranges)
            kv = kv_bytes(shape, c, args.context)
            row.update(k=kv["k"], channels=kv["channels"], label_bits=c.label_bits,
                       kv_ratio_layer=round(kv["per_sparse_layer"]["ratio"], 4),
                       kv_ratio_layer_codes_only=round(kv["per_sparse_layer"]["ratio_without_meta"], 4),
                       kv_ratio_model=round(kv["model"]["ratio"], 4), kv_bytes=kv)
        t0 = time.perf_counter()
        ppl = perplexity(lm.model, windows, batch_size=1)
        row.update(perplexity=ppl["perplexity"], nll=ppl["nll"], ppl_s=round(time.perf_counter() - t0, 1))
        key = "dense" if level is None else f"{level}:{statistic}"
        if key in passkey_runs or (level is not None and f"{level}:auto" in passkey_runs and statistic == chosen):
            t0 = time.perf_counter()
            pk = passkey(lm.model, lm.tokenizer, args.context, args.trials, seed=args.seed)
            row.update(passkey=pk["accuracy"], passkey_correct=pk["correct"], passkey_trials=pk["trials"],
                       passkey_s=round(time.perf_counter() - t0, 1), passkey_results=pk["results"])
        ds_runtime.uninstall(lm.model)
        print({k: v for k, v in row.items() if k not in ("kv_bytes", "passkey_results")}, file=sys.stderr, flush=True)
        return row

    rows.append(measure(None, None))
    dense = rows[0]["perplexity"]
    for level in args.levels.split(","):
        for statistic in args.statistics.split(","):
            rows.append(measure(level, statistic))
    for r in rows:
        r["ratio_vs_dense"] = round(r["perplexity"] / dense, 4)
        r.setdefault("passkey", None)
    random_ppl = {r["level"]: r["perplexity"] for r in rows if r["statistic"] == "random"}
    result = {
        "model": args.model, "context": args.context,
        "levels": {lv: {"k": max(args.sink + args.recent + 1, round(tok * args.context)), "channel_fraction": ch,
                        "label_bits": bits, "definition": "token sparsity k/context and label sparsity "
                                                          "r*bits/(head_dim*16), both equal to the level"}
                   for lv, (tok, ch, bits) in LEVELS.items() if lv in args.levels.split(",")},
        "double_sparsity": {"sink": args.sink, "recent": args.recent, "select": args.select,
                            "dense_layers": args.dense_layers,
                            "label_scale": args.label_scale,
                            "label_quantization": "round-to-nearest, " + (
                                "per key channel over exactly the range calibration saw (values beyond clip)"
                                if args.label_scale == "channel" else
                                "per token over [min(x, 0), max(x, 0)] with an integer zero point")},
        "calibration": {"source": "builtin", "samples": args.samples, "seq_len": args.seq_len, "seed": args.seed,
                        "seconds": round(calib_s, 1)},
        "auto": {**selection, "level": "1/16", "seconds": round(select_s, 1)},
        "evaluation": {"data": "builtin eval split", "seq_len": args.context, "windows": int(windows.shape[0]),
                       "tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
                       "simulation": "every query position attends to its own top-k of its causal prefix",
                       "passkey": {"trials": args.trials, "seed": args.seed, "configurations": sorted(passkey_runs),
                                   "prompt": "sparsify.eval.passkey (repeated filler, key at a random depth, "
                                             "greedy answer; sparse attention at every prompt position)"}},
        "threads": args.threads, "dense_perplexity": dense,
        "calibrated_beat_random": {lv: all(r["perplexity"] < random_ppl[lv] for r in rows
                                           if r["level"] == lv and r["statistic"] not in ("random", "-"))
                                   for lv in random_ppl},
        "wall_s": round(time.perf_counter() - t_all, 1), "rows": rows,
    }
    write_results(out_json, result)
    print(f"dense perplexity {dense:.3f}; auto picked {chosen} ({selection['losses']})")
    print_table([{**r, "passkey_txt": "-" if r["passkey"] is None else f"{r['passkey_correct']}/{r['passkey_trials']}",
                  "k": r.get("k", "-"), "r_bits": f"{r['channels']}@{r['label_bits']}" if "channels" in r else "-",
                  "kv": r.get("kv_ratio_layer", 1.0)} for r in rows],
                [("level", "level", 6, ""), ("statistic", "statistic", 9, ""), ("k", "k", 5, ""),
                 ("r@bits", "r_bits", 7, ""), ("ppl", "perplexity", 8, ".3f"), ("vs dense", "ratio_vs_dense", 8, ".4f"),
                 ("passkey", "passkey_txt", 8, ""), ("KV read", "kv", 7, ".4f")])
    print(f"results -> {out_json}")


if __name__ == "__main__":
    main()
