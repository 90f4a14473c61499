"""CPU crossover table: each CPU path of a packed linear against ``F.linear`` on the dense weight.

For SmolLM2-135M's layer shapes and token counts 1..128: our C kernel on 2:4 weights (float32 values,
int8, int4 group 64), torch's ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu`` (float32 and
bfloat16 activations), the per-call dense rebuild (what runs without SPARSIFY_CPU_CACHE), and torch's
CSR / BSR matmul for unstructured / block weights at densities 0.5..0.05, and our C BSR kernel
(``cpu-bsr-c``) on the same block weights. Decode is memory-bound, so
every case rotates through enough weight copies to exceed the L3 cache (a model's weights never fit
it), and the paths of one case run interleaved, round by round (the machine is shared): the median
per call is reported. The crossovers it prints (largest token count at which a path beat, over the
shapes, the dense weight, and the per-call rebuild that runs without SPARSIFY_CPU_CACHE) set
CPU_MAX_TOKENS / SPARSE_MAX_TOKENS in sparsify/kernels/cpu/paths.py.

    python bench/cpu_kernels.py                  # -> bench/results/cpu_kernels.json
    python bench/cpu_kernels.py --quick          # a smoke run: one small shape, tokens 1 and 16, in cache
    python bench/cpu_kernels.py --only bsr --tokens 1,16,128,1024 --out bench/results/cpu_kernels_bsr.json
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128]
L3_BYTES = 64 << 20  # rotate through at least this many weight bytes (twice a 32 MiB L3)


def weight_cases(out, inp, seed):
    """(name, kind, fmt, tensors, attrs, dense) for one random weight of each kind measured."""
    import torch

    from sparsify import formats
    from sparsify.kernels import reference as R
    from sparsify.quant import rtn
    from sparsify.quant.spec import QuantSpec

    w = R.random_nm_weight(out, inp, 2, 4, seed=seed)  # (out, in) float32, exactly 2:4
    rows = [("nm", "float", formats.pack("nm", w, n=2, m=4), w)]
    for kind, spec in (("int8", QuantSpec("int8")), ("int4", QuantSpec("int4", 64))):
        wq, params = rtn.fake_quantize(w, spec)
        rows.append(("nm", kind, formats.pack("nm", wq, n=2, m=4, quant=params), wq))
    g = torch.Generator().manual_seed(seed)
    for d in (0.5, 0.3, 0.1, 0.05):
        ws = torch.where(torch.rand(out, inp, generator=g) < d, torch.randn(out, inp, generator=g), 0.0)  # +0.0 only
        rows.append(("bitmask", f"float@{d}", formats.pack("bitmask", ws), ws))
        keep = (torch.rand(out // 16, inp // 16, generator=g) < d).repeat_interleave(16, 0).repeat_interleave(16, 1)
        wb = torch.where(keep, torch.randn(out, inp, generator=g), 0.0)
        rows.append(("bsr", f"float@{d}", formats.pack("bsr", wb, block=(16, 16)), wb))
    return [(fmt, kind, t, a, dense) for fmt, kind, (t, a), dense in rows]


def paths_for(fmt, kind, dtype_name):
    if fmt == "bitmask":
        return ["cpu-csr"]
    if fmt == "bsr":
        return ["cpu-bsr-c", "cpu-bsr"]
    extra = {"float": [], "int8": ["torch-int8pack"], "int4": ["torch-int4pack"]}[kind]
    return (["cpu-nm24"] if dtype_name == "float32" else []) + ["cpu-unpack"] + extra


def measure(out, inp, tokens_list, dtype, rounds, seed=0, rotate=L3_BYTES, only=None) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from sparsify.kernels.cpu.paths import PATHS

    copies = max(2, -(-rotate // (out * inp * 4)))
    cases = [weight_cases(out, inp, seed + c) for c in range(copies)]  # cases[copy][i]
    rows = []
    for i, (fmt, kind, _, attrs, _) in enumerate(cases[0]):
        dname = str(dtype).removeprefix("torch.")
        names = [p for p in paths_for(fmt, kind, dname)]
        if (dtype != torch.float32 and fmt != "nm") or (only and fmt != only):
            continue
        denses = [c[i][4].to(dtype) for c in cases]
        hopeless: set = set()  # paths already 3x slower than dense at fewer tokens: not timed further
        for tokens in tokens_list:
            x = torch.randn(tokens, inp).to(dtype)  # (tokens, in)
            fns = {"dense": [lambda w=w: F.linear(x, w) for w in denses]}
            for name in names:
                if name not in hopeless and PATHS[name].accepts(x, fmt, attrs, cases[0][i][2]):
                    fns[name] = [lambda c=c, name=name: PATHS[name].run(x, fmt, c[i][2], c[i][3], None) for c in cases]
            times = {n: [] for n in fns}
            for fn in fns.values():  # warm-up: builds caches (torch's packed layouts, CSR)
                [f() for f in fn]
            for _ in range(rounds):
                order = list(fns)
                random.shuffle(order)
                for n in order:
                    t0 = time.perf_counter()
                    for f in fns[n]:
                        f()
                    times[n].append((time.perf_counter() - t0) / len(fns[n]) * 1e3)
            ms = {n: statistics.median(v) for n, v in times.items()}
            hopeless |= {n for n, v in ms.items() if v > 3 * ms["dense"] and n != "cpu-unpack"}  # the fallback: always
            rows.append({"shape": [out, inp], "format": fmt, "kind": kind, "dtype": dname, "tokens": tokens,
                         "ms": ms, "speedup": {n: ms["dense"] / v for n, v in ms.items() if n != "dense"}})
            print(f"{out}x{inp} {fmt:8}{kind:10}{dname:9} T={tokens:<4}" +
                  " ".join(f"{n}={v:.3f}" for n, v in ms.items()), file=sys.stderr, flush=True)
    return rows


def crossovers(rows) -> dict:
    """(path, format, kind, dtype) -> {"dense": T, "rebuild": T}: the largest token count up to which the path
    beat, at every token count up to it, the dense weight (the alternative under SPARSIFY_CPU_CACHE=1) and
    the per-call rebuild "cpu-unpack" (the alternative without it; measured for 2:4 only), by the geometric
    mean of its speedups over the shapes (one noisy small shape does not decide). A path dropped as
    hopeless at some token count counts as losing there."""
    every = sorted({r["tokens"] for r in rows})
    wins: dict = {}
    for r in rows:
        for path, t in r["ms"].items():
            if path in ("dense", "cpu-unpack"):
                continue
            for rival in ("dense", "cpu-unpack"):
                if rival in r["ms"]:
                    key = (path, r["format"], r["kind"], r["dtype"], rival)
                    wins.setdefault(key, {}).setdefault(r["tokens"], []).append(math.log(r["ms"][rival] / t))
    out: dict = {}
    for (*key, rival), by_tokens in wins.items():
        limit = 0
        for tokens in every:
            if not by_tokens.get(tokens) or statistics.fmean(by_tokens[tokens]) <= 0:
                break
            limit = tokens
        out.setdefault("|".join(key), {})["dense" if rival == "dense" else "rebuild"] = limit
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 64 x 128, tokens 1 and 16, 2 rounds, in cache")
    ap.add_argument("--only", default=None, help="one format's rows only (nm, bitmask, bsr)")
    ap.add_argument("--tokens", default=None, help="comma list of token counts (default 1..128)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_kernels.json"))
    args = ap.parse_args(argv)
    import torch

    from quality import write_results
    from sparsify.kernels.cpu import native

    if args.threads:
        torch.set_num_threads(args.threads)
    if native.unavailable():
        print(f"note: {native.unavailable()}", file=sys.stderr)
    shapes, tokens, rounds = ([(64, 128)], [1, 16], 2) if args.quick else (SHAPES, TOKENS, args.rounds)
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else tokens
    rotate = 0 if args.quick else L3_BYTES
    rows = [r for dtype in (torch.float32, torch.bfloat16) for (o, i) in shapes
            for r in measure(o, i, tokens, dtype, rounds, rotate=rotate, only=args.only)]
    table = crossovers(rows)
    for key, limit in sorted(table.items()):
        print(f"{key:40} beats dense up to {limit['dense']:>4} tokens, the per-call rebuild up to "
              f"{limit.get('rebuild', '-'):>4}")
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": rounds,
              "l3_rotation_bytes": rotate, "crossover_tokens": table, "rows": rows}
    write_results(Path(args.out), result)
    print(f"results -> {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
