"""Scale: prune a checkpoint several times larger than ``--max-memory`` and measure what stays resident.

Builds a synthetic Llama-architecture checkpoint (random weights, SmolLM2's tokenizer, sharded
safetensors like a Hugging Face download), prunes it twice (streamed under ``--max-memory``, and in
memory), then evaluates the streamed artifact's perplexity twice (offloaded under the same cap, and
in memory); each run in a fresh process. Reported per run: wall time and the process's peak resident
memory above what it held just before the run (imports and one small warm-up run are interpreter
overhead; the kernel's peak is reset after them); whether the two artifacts hold bit-identical
tensors and the two evaluations print the same perplexity. Issue #15's targets: on a checkpoint 4x
the cap, the streamed prune and the offloaded evaluation stay under the cap. Then (``--parts ranks``)
the in-memory prune by one process against ``torchrun --nproc-per-node 2``: wall times, and how far
the two artifacts are apart.

    python bench/scale.py                       # ~3 GB checkpoint, --max-memory 1GB
    python bench/scale.py --layers 8 --hidden 1024 --max-memory 300MB   # a quick look
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def make_checkpoint(path: Path, layers: int, hidden: int, intermediate: int, tokenizer=None,
                    shard: str = "500MB", seed: int = 0) -> Path:
    """A random-weight Llama checkpoint at ``path`` (float32, sharded at ``shard``, N(0, 0.02) matrices)
    with ``tokenizer`` (default: SmolLM2's, whose vocabulary sets the embedding size)."""
    import torch
    from transformers import AutoTokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        from sparsify.models.load import resolve

        tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m").config_dir)
    vocab = len(tokenizer)
    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 3) if heads % 3 == 0 else heads,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size=shard)
    tokenizer.save_pretrained(path)
    return path


def _prune_measured(model_dir: str, out: str, method: str, scheme: str, samples: int, seq_len: int,
                    max_memory: str | None, warmup_dir: str, batch_size: int = 8) -> dict:
    """In a fresh process: a tiny warm-up prune (imports), then the measured one."""
    import psutil

    from sparsify.config import CalibConfig, PruneConfig
    from sparsify.pipeline import prune
    from sparsify.resources import peak_rss_mb, reset_peak_rss

    warm = PruneConfig(method=method, scheme=scheme, max_memory=max_memory and "1GB", calib=CalibConfig(samples=2, seq_len=16))
    prune(warmup_dir, warm, Path(out).with_name("warmup"))
    before = psutil.Process().memory_info().rss / (1 << 20)
    if not reset_peak_rss():
        raise RuntimeError("this kernel cannot reset the peak resident memory (/proc/self/clear_refs)")
    t = time.perf_counter()
    manifest = prune(model_dir, PruneConfig(method=method, scheme=scheme, max_memory=max_memory,
                                            calib=CalibConfig(samples=samples, seq_len=seq_len,
                                                              batch_size=batch_size)), out)
    return {"wall_s": round(time.perf_counter() - t, 2), "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "peak_above_before_mb": round(peak_rss_mb() - before, 1),
            "planned_peak_mb": round(manifest.get("streaming", {}).get("planned_peak_bytes", 0) / (1 << 20), 1)}


def _eval_measured(artifact: str, max_memory: str | None, warm_artifact: str, seq_len: int, windows: int) -> dict:
    """In a fresh process: a warm-up evaluation of a tiny artifact (imports), then the measured one."""
    import psutil

    from sparsify.eval.run import evaluate
    from sparsify.resources import peak_rss_mb, reset_peak_rss

    def run(art, mm, n, length):
        return evaluate(art, task="perplexity", seq_len=length, max_windows=n, batch_size=2, auto_baseline=False,
                        max_memory=mm)

    run(warm_artifact, max_memory and "1GB", 1, 16)  # the warm-up model's context is short
    before = psutil.Process().memory_info().rss / (1 << 20)
    reset_peak_rss()
    t = time.perf_counter()
    r = run(artifact, max_memory, windows, seq_len)
    return {"wall_s": round(time.perf_counter() - t, 2), "perplexity": r["perplexity"]["perplexity"],
            "peak_above_before_mb": round(peak_rss_mb() - before, 1)}


def measure(model_dir: Path, where: Path, args) -> dict:
    from official_check import in_fresh_process

    from sparsify.exporters.safetensors_io import read_tensors

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import make_tiny

    warm = make_tiny("llama", where / "warm-model")
    rows = []
    for label, mm in (("streamed", args.max_memory), ("in memory", None)):
        out = where / label.replace(" ", "-") / "artifact"
        out.parent.mkdir()
        r = in_fresh_process(_prune_measured, str(model_dir), str(out), args.method, args.scheme, args.samples,
                             args.seq_len, mm, str(warm), args.batch_size)
        rows.append({"run": label, "max_memory": mm, **r})
        print(f"{label}: {r}", file=sys.stderr, flush=True)
    a, b = (read_tensors(where / d / "artifact") for d in ("streamed", "in-memory"))
    identical = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    del a, b
    evals = []
    for label, mm in (("offloaded", args.max_memory), ("in memory", None)):
        r = in_fresh_process(_eval_measured, str(where / "streamed" / "artifact"), mm,
                             str(where / "streamed" / "warmup"), args.eval_seq_len, args.eval_windows)
        evals.append({"run": label, "max_memory": mm, **r})
        print(f"eval {label}: {r}", file=sys.stderr, flush=True)
    from sparsify.streaming import parse_size

    cap_mb = parse_size(args.max_memory) / (1 << 20)
    size_mb = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / (1 << 20)
    return {"checkpoint_mb": round(size_mb, 1), "cap_mb": round(cap_mb, 1), "checkpoint_over_cap": round(size_mb / cap_mb, 2),
            "method": args.method, "scheme": args.scheme, "calibration": {"samples": args.samples, "seq_len": args.seq_len},
            "rows": rows, "identical_tensors": identical, "under_cap": rows[0]["peak_above_before_mb"] <= cap_mb,
            "eval": {"seq_len": args.eval_seq_len, "windows": args.eval_windows, "rows": evals,
                     "same_perplexity": evals[0]["perplexity"] == evals[1]["perplexity"],
                     "under_cap": evals[0]["peak_above_before_mb"] <= cap_mb}}


def _cli_prune(model_dir: Path, out: Path, nproc: int, args) -> dict:
    """``sparsify prune`` in memory, by one process or ``torchrun --nproc-per-node nproc`` (gloo, one
    thread per rank, so both use every core): wall time, and rank 0's own timing from its manifest."""
    import json
    import os
    import subprocess

    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launch, "-m", "sparsify", "prune", str(model_dir), "-o", str(out), "--method", args.method,
           "--scheme", args.scheme, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({"OMP_NUM_THREADS": "1"} if nproc > 1 else {})}
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    timing = json.loads(p.stdout)["timing"]
    return {"wall_s": round(time.perf_counter() - t, 2), "calibrate_prune_s": timing["calibrate_prune_s"],
            "rank0_peak_rss_mb": timing["peak_rss_mb"]}


def compare_ranks(model_dir: Path, where: Path, args) -> dict:
    """1 process against ``args.ranks`` torchrun processes on the same checkpoint and calibration data:
    times, and how far apart the artifacts are (sums reduced in another order: fp32 roundings).

    The control is the same 1-process run with half the batch size, which changes nothing but the
    order of the same sums: SparseGPT's sequential 2:4 choices amplify roundings into different
    near-tie masks, block after block, and the control shows how far that alone goes."""
    import argparse

    rows = []
    for n in (1, args.ranks):
        rows.append({"processes": n, **_cli_prune(model_dir, where / f"ranks-{n}", n, args)})
        print(f"{n} process(es): {rows[-1]}", file=sys.stderr, flush=True)
    result = {"rows": rows, **weight_agreement(where / "ranks-1", where / f"ranks-{args.ranks}")}
    if args.batch_size > 1:
        half = argparse.Namespace(**{**vars(args), "batch_size": args.batch_size // 2})
        _cli_prune(model_dir, where / "control", 1, half)
        result["control"] = {"batch_size": half.batch_size, **weight_agreement(where / "ranks-1", where / "control")}
    return result


def weight_agreement(one: Path, two: Path) -> dict:
    """How two artifacts of the same model differ, compared as dense weights (a packed tensor's bytes
    shift when one mask position flips): the share of weights whose kept / pruned state differs, and
    ||W1 - W2|| / ||W1|| over all compressed layers and at the worst layer."""
    import sparsify
    from sparsify.exporters.safetensors_io import read_tensors
    from sparsify.runtime.sparse_linear import SparseLinear

    a, b = read_tensors(one), read_tensors(two)
    same = sum(a[k].equal(b[k]) for k in a if k in b)
    keys_match = a.keys() == b.keys()
    del a, b
    ma, mb = sparsify.load(one)[0].model, sparsify.load(two)[0].model
    layers = {n: m for n, m in ma.named_modules() if isinstance(m, SparseLinear)}
    flips = count = 0
    diff2 = norm2 = worst = 0.0
    for name, m in layers.items():
        wa, wb = m.dense_weight().float(), mb.get_submodule(name).dense_weight().float()  # (out, in)
        flips += int(((wa != 0) != (wb != 0)).sum())
        count += wa.numel()
        d, n = float((wa - wb).norm()) ** 2, float(wa.norm()) ** 2
        diff2, norm2, worst = diff2 + d, norm2 + n, max(worst, (d / max(n, 1e-30)) ** 0.5)
    return {"tensors_identical": int(same), "same_keys": keys_match, "layers": len(layers),
            "mask_flip_share": flips / max(count, 1), "rel_diff": (diff2 / max(norm2, 1e-30)) ** 0.5,
            "worst_layer_rel_diff": worst}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--max-memory", default="1GB")
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--scheme", default="2:4")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--parts", default="streaming,ranks",
                    help="streaming: prune and eval under the cap and in memory; ranks: 1 vs --ranks processes")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    return ap


def report(result: dict, args) -> None:
    from quality import print_table

    if "rows" in result:
        print(f"checkpoint {result['checkpoint_mb']:,.0f} MiB = {result['checkpoint_over_cap']}x --max-memory "
              f"{args.max_memory}; {args.method} {args.scheme}, {args.samples} x {args.seq_len} tokens")
        print_table(result["rows"], [("run", "run", 10, ""), ("wall s", "wall_s", 8, ".1f"),
                                     ("peak MiB", "peak_above_before_mb", 9, ".0f"), ("planned", "planned_peak_mb", 8, ".0f")])
        print(f"identical tensors: {result['identical_tensors']}; streamed peak under the cap: {result['under_cap']}")
        ev = result["eval"]
        print_table(ev["rows"], [("eval", "run", 10, ""), ("wall s", "wall_s", 8, ".1f"),
                                 ("peak MiB", "peak_above_before_mb", 9, ".0f"), ("perplexity", "perplexity", 11, ".3f")])
        print(f"same perplexity: {ev['same_perplexity']}; offloaded eval under the cap: {ev['under_cap']}")
    if "ranks" in result:
        r = result["ranks"]
        print_table(r["rows"], [("processes", "processes", 9, "d"), ("wall s", "wall_s", 8, ".1f"),
                                ("prune s", "calibrate_prune_s", 8, ".1f"), ("rank 0 MiB", "rank0_peak_rss_mb", 10, ".0f")])
        print(f"{r['tensors_identical']} tensors identical; {r['mask_flip_share']:.2e} of the weights kept by one run "
              f"and pruned by the other; dense weights apart by {r['rel_diff']:.1e} (worst layer "
              f"{r['worst_layer_rel_diff']:.1e}) of their norm")
        if "control" in r:
            c = r["control"]
            print(f"control, 1 process at --batch-size {c['batch_size']}: {c['mask_flip_share']:.2e} of the weights "
                  f"flipped; apart by {c['rel_diff']:.1e} (worst layer {c['worst_layer_rel_diff']:.1e})")


def main(argv=None) -> dict:
    from quality import write_results

    args = parser().parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts <= {"streaming", "ranks"}:
        raise SystemExit(f"--parts {args.parts}: use streaming and/or ranks")
    with tempfile.TemporaryDirectory(prefix="sparsify-scale-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        model_dir = make_checkpoint(tmp / "model", args.layers, args.hidden, args.intermediate)
        print(f"checkpoint written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        result = measure(model_dir, tmp, args) if "streaming" in parts else {}
        if "ranks" in parts:
            result["ranks"] = compare_ranks(model_dir, tmp, args)
    report(result, args)
    write_results(Path(args.out), result)
    print(f"results -> {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
