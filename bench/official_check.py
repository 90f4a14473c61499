"""Cross-check: the official Wanda repository's pruners on the same model and data as bench/quality.py.

Runs ``lib.prune.prune_wanda`` / ``prune_sparsegpt`` from a local checkout of
https://github.com/locuslab/wanda (its SparseGPT is the IST-DASLab code it vendors), and with
``--admm-repo`` ``prune_admm`` from github.com/fmfi-compbio/admm-pruning (ADMM-Grad, a fork of the
same code; config ``admm:2:4``), each config in a fresh process, on SmolLM2-135M
with sparsify's built-in calibration batches (the same 64 x 512 tokens, seed 0, that `sparsify prune`
uses), then measures perplexity with sparsify's evaluator on the same 32 x 512 held-out windows, and
prints it next to bench/results/quality_smollm2.json. Nothing of that repository is part of sparsify:
pass its path.

Shims, because the official code targets 2023 transformers on CUDA (none change the algorithm):
``datasets`` is stubbed (its C4 loader is replaced by our batches), ``torch.cuda.synchronize`` is a no-op
on CPU, ``model.seqlen`` / ``model.hf_device_map`` are set, and while it prunes, each decoder layer is
given its rotary ``position_embeddings`` and returns a tuple (transformers 5 layers need the former and
return a bare tensor, which the official ``layer(...)[0]`` would slice).

    git clone https://github.com/locuslab/wanda /tmp/wanda   # once
    git clone https://github.com/fmfi-compbio/admm-pruning /tmp/admm   # once, for admm:* configs
    python bench/official_check.py --repo /tmp/wanda [--admm-repo /tmp/admm]
        [--configs wanda:unstructured,wanda:2:4,sparsegpt:2:4,admm:2:4]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _official(repo: str):
    if not (Path(repo) / "lib" / "prune.py").is_file():
        raise SystemExit(f"--repo {repo}: no lib/prune.py there; pass a checkout of github.com/locuslab/wanda")
    sys.modules.setdefault("datasets", types.SimpleNamespace(load_dataset=None))
    torch.cuda.synchronize = lambda *a, **k: None
    sys.path.insert(0, repo)
    import lib.prune  # noqa: E402  (the official module)

    return lib.prune


def _patch_layers(model):
    """transformers-5 decoder layers -> the 2023 calling convention; returns an undo function."""
    cls = type(model.model.layers[0])
    orig, rotary = cls.forward, model.model.rotary_emb

    def forward(self, hidden_states, attention_mask=None, position_ids=None, **kw):
        if kw.get("position_embeddings") is None:
            pid = position_ids if position_ids is not None else torch.arange(hidden_states.shape[1])[None]
            kw["position_embeddings"] = rotary(hidden_states, pid)
        out = orig(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids, **kw)
        return (out,) if isinstance(out, torch.Tensor) else out

    cls.forward = forward
    return lambda: setattr(cls, "forward", orig)


def run(prune_mod, method: str, scheme: str, args) -> dict:
    from sparsify.calibrate.batches import build_batches
    from sparsify.calibrate.data import eval_windows, load_text
    from sparsify.config import CalibConfig
    from sparsify.eval.perplexity import perplexity
    from sparsify.models.load import load_model, resolve
    from sparsify.resources import peak_rss_mb

    lm = load_model(resolve(args.model))
    model, tok = lm.model, lm.tokenizer
    batches = build_batches("text", CalibConfig(samples=args.samples, seq_len=args.seq_len, seed=args.seed),
                            tokenizer=tok)
    samples = [(ids[None], None) for b in batches for ids in b["input_ids"]]  # the official loader's shape
    prune_mod.get_loaders = lambda *a, **k: (samples, None)
    model.seqlen, model.hf_device_map = args.seq_len, {}
    n, m = (0, 0) if scheme == "unstructured" else map(int, scheme.split(":"))
    opts = types.SimpleNamespace(nsamples=len(samples), seed=args.seed, sparsity_ratio=0.5, use_variant=False)
    undo, t = _patch_layers(model), time.perf_counter()
    try:
        with torch.no_grad():
            fn = getattr(prune_mod, f"prune_{method}")
            fn(opts, model, tok, torch.device("cpu"), prune_n=n, prune_m=m)
    finally:
        undo()
    seconds = time.perf_counter() - t
    rss = peak_rss_mb()  # this process: a fresh one under `in_fresh_process`
    windows = eval_windows(tok, load_text("builtin", "eval"), args.seq_len, args.windows)
    return {"config": f"{method} {scheme}", "perplexity": perplexity(model, windows)["perplexity"],
            "prune_s": round(seconds, 3), "peak_rss_mb": round(rss)}


def run_official(repo: str, method: str, scheme: str, args) -> dict:
    return run(_official(repo), method, scheme, args)


def in_fresh_process(fn, *a) -> dict:
    """``fn(*a)`` in a spawned process: each run starts from a clean interpreter (allocator state, caches,
    process-wide settings), and two checkouts' ``lib`` packages never meet in one process."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *a).result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True, help="local checkout of github.com/locuslab/wanda")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--admm-repo", default=None, help="local checkout of github.com/fmfi-compbio/admm-pruning")
    ap.add_argument("--configs", default=None,
                    help="method:scheme list (default: wanda unstructured and 2:4, sparsegpt 2:4, and admm 2:4 "
                         "with --admm-repo)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ours", default=str(ROOT / "bench" / "results" / "quality_smollm2.json"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "official_check_smollm2.json"))
    args = ap.parse_args()
    _official(args.repo)  # a bad --repo fails here, before any run
    if args.admm_repo:
        _official(args.admm_repo)
    configs = args.configs or "wanda:unstructured,wanda:2:4,sparsegpt:2:4" + (",admm:2:4" if args.admm_repo else "")
    ours = {r["config"]: r["perplexity"] for r in json.loads(Path(args.ours).read_text())["rows"]}
    rows = []
    for c in configs.split(","):
        method, scheme = c.split(":", 1)
        repo = args.admm_repo if method == "admm" else args.repo
        if repo is None:
            raise SystemExit(f"config {c}: pass --admm-repo (a checkout of github.com/fmfi-compbio/admm-pruning)")
        r = in_fresh_process(run_official, repo, method, scheme, args)
        r["repo"] = {args.repo: "github.com/locuslab/wanda", args.admm_repo: "github.com/fmfi-compbio/admm-pruning"}[repo]
        r["sparsify_perplexity"] = ours.get(r["config"])
        r["relative_difference"] = None if r["sparsify_perplexity"] is None else \
            round(r["sparsify_perplexity"] / r["perplexity"] - 1, 4)
        rows.append(r)
        print(json.dumps(r), file=sys.stderr)
    Path(args.out).write_text(json.dumps({"official_repo": "github.com/locuslab/wanda", "model": args.model,
                                          "calibration": {"samples": args.samples, "seq_len": args.seq_len,
                                                          "seed": args.seed},
                                          "eval_windows": args.windows, "rows": rows}, indent=1))
    print(f"{'config':<24} {'official ppl':>12} {'sparsify ppl':>12} {'diff':>7}")
    for r in rows:
        ours_ppl = r["sparsify_perplexity"]
        print(f"{r['config']:<24} {r['perplexity']:>12.2f} {ours_ppl or float('nan'):>12.2f} "
              f"{(r['relative_difference'] or 0) * 100:>6.2f}%")


if __name__ == "__main__":
    main()
