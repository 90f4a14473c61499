"""Kernel benchmark: our 2:4 Triton kernels vs dense torch matmul and torch's semi-structured 2:4.

Shapes (out, in) from SmolLM2-135M, Llama-7B and ViT-B; token counts 1..4096. Variants of ours:
2:4 bf16 values, 2:4 int8 weight-only, 2:4 int4 group 128, W8A8 (int8 activations), and the BSR
kernel on 16 x 16 tiles with 50% and 90% of them removed (issue #11's GPU table). Per case:
median time over reps (CUDA events; L2 flushed before each rep unless --no-flush; launched from a
CUDA graph unless --no-graph, so Python overhead does not hide the kernel), dense-equivalent TFLOP/s
(2*T*in*out / t), GB/s of the bytes actually moved (packed weight + x + y), ratio to dense (same
dtype), and the bytes limit dense weight bytes / packed weight bytes: the ceiling for a memory-bound
kernel (Triton has no sparse tensor-core instruction). The table sets the dispatch thresholds in
sparsify/kernels/__init__.py (TRITON_MAX_TOKENS).

    python bench/kernel_speed.py                 # on a GPU: the full table -> bench/results/kernels_<gpu>.json
    python bench/kernel_speed.py --cpu-smoke     # no GPU (automatic then): one tiny size under TRITON_INTERPRET=1

Not named bench/kernels.py: run as a script, bench/ comes first on sys.path, and that name would
shadow the ``kernels`` package transformers imports when it finds one.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"smollm2": [(576, 576), (1536, 576), (576, 1536), (192, 576)],
          "llama7b": [(4096, 4096), (11008, 4096), (4096, 11008)], "vit-b": [(768, 3072), (3072, 768)]}
TOKENS = [1, 16, 64, 256, 1024, 4096]
VARIANTS = ["bf16", "int8", "int4-g128", "w8a8", "bsr16-50", "bsr16-90"]  # bsr16-S: 16 x 16 tiles, S% removed
SMOKE = {"shape": (24, 64), "tokens": [1, 3]}


def make_case(out: int, inp: int, variant: str, device, dtype, seed: int = 0):
    """Random 2:4 weight packed for ``variant`` -> (run(x) with our kernel, packed bytes, dense W in dtype)."""
    import torch

    from sparsify.kernels import reference as R
    from sparsify.kernels.triton.nm_matmul import nm_linear
    from sparsify.kernels.triton.nm_matmul_wq import nm_linear_wq
    from sparsify.kernels.triton.w8a8 import w8a8_linear

    w = R.random_nm_weight(out, inp, 2, 4, seed=seed)  # (out, in) fp32
    if variant.startswith("bsr"):
        from sparsify import formats
        from sparsify.kernels.triton.bsr_matmul import bsr_linear

        g = torch.Generator().manual_seed(seed)
        keep = torch.rand(-(-out // 16), -(-inp // 16), generator=g) >= int(variant.split("-")[1]) / 100
        keep = keep.repeat_interleave(16, 0).repeat_interleave(16, 1)[:out, :inp]  # (out, in)
        w = torch.where(keep, torch.randn(out, inp, generator=g), 0.0)  # (out, in) whole zero tiles
        tensors, _ = formats.pack("bsr", w.to(dtype), block=(16, 16))
        values, col_idx, row_ptr = (tensors[k].to(device) for k in ("values", "col_idx", "row_ptr"))
        packed = (values, col_idx, row_ptr)
        run = lambda x: bsr_linear(x, values, col_idx, row_ptr, (out, inp))  # noqa: E731
    elif variant == "bf16":
        values, meta = (t.to(device) for t in R.nm_pack_ref(w.to(dtype), 2, 4))
        packed = (values, meta)
        run = lambda x: nm_linear(x, values, meta, 2, 4)  # noqa: E731
    else:
        kind, gs = {"int8": ("int8", None), "int4-g128": ("int4", 128), "w8a8": ("int8", None)}[variant]
        codes, meta, scale = (t.to(device) for t in R.quant_pack_ref(w, 2, 4, kind, gs)[:3])  # symmetric: no zero
        packed = (codes, meta, scale)
        if variant == "w8a8":
            run = lambda x: w8a8_linear(x, codes, meta, scale, 2, 4)  # noqa: E731
        else:
            run = lambda x: nm_linear_wq(x, codes, meta, scale, None, 2, 4, kind, gs or inp)  # noqa: E731
    nbytes = sum(t.numel() * t.element_size() for t in packed)
    return run, nbytes, w.to(dtype).to(device)


def time_ms(fn, device: str, reps: int, flush: bool, graph: bool) -> float:
    """Median milliseconds of fn(): CUDA events (optionally replaying a CUDA graph, flushing L2), or wall clock."""
    import time

    import torch

    fn()
    if device != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            fn = g.replay
        except RuntimeError:  # not capturable: time eagerly
            torch.cuda.synchronize()
    scratch = torch.empty(256 << 20, dtype=torch.uint8, device="cuda") if flush else None  # > any L2
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if scratch is not None:
            scratch.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def run_case(out, inp, tokens, variant, device, dtype, reps, flush=True, graph=True) -> dict:
    import torch
    import torch.nn.functional as F

    from sparsify import kernels

    run, packed_bytes, dense = make_case(out, inp, variant, device, dtype)
    x = torch.randn(tokens, inp, device=device, dtype=dtype)  # (tokens, in)
    fmt = "bsr" if variant.startswith("bsr") else "nm"
    attrs = {"shape": [out, inp], "dtype": str(dtype).removeprefix("torch."),
             **({"block": [16, 16]} if fmt == "bsr" else
                {"n": 2, "m": 4, "bits": 2, **{"bf16": {}, "int8": {"quant": "int8"},
                                               "int4-g128": {"quant": "int4", "group_size": 128},
                                               "w8a8": {"quant": "int8", "activations": "int8"}}[variant]})}
    row = {"out": out, "in": inp, "tokens": tokens, "variant": variant,
           "dispatch": kernels.kernel_name(x, fmt, attrs) if device == "cuda" else "triton (forced)"}
    row["dense_ms"] = time_ms(lambda: F.linear(x, dense), device, reps, flush, graph)
    row["ours_ms"] = time_ms(lambda: run(x), device, reps, flush, graph)
    if variant == "bf16" and device == "cuda":
        try:
            semi = torch.sparse.to_sparse_semi_structured(dense)
            row["semi_ms"] = time_ms(lambda: F.linear(x, semi), device, reps, flush, graph)
        except (RuntimeError, ValueError) as e:  # unsupported shape / GPU: report it, keep the table going
            row["semi_error"] = str(e).splitlines()[0][:120]
    io = (tokens * inp + tokens * out) * x.element_size()  # x read + y written
    dense_bytes = dense.numel() * dense.element_size()
    row["tflops"] = 2 * tokens * inp * out / (row["ours_ms"] * 1e-3) / 1e12
    row["gbs"] = (packed_bytes + io) / (row["ours_ms"] * 1e-3) / 1e9
    row["dense_gbs"] = (dense_bytes + io) / (row["dense_ms"] * 1e-3) / 1e9
    row["speedup_vs_dense"] = row["dense_ms"] / row["ours_ms"]
    row["bytes_limit"] = dense_bytes / packed_bytes
    row["io_bytes_limit"] = (dense_bytes + io) / (packed_bytes + io)  # the same with activations counted
    return row


def print_table(rows) -> None:
    head = f"{'out x in':>12} {'T':>5} {'variant':<10}{'dense ms':>10}{'semi ms':>10}{'ours ms':>10}" \
           f"{'x dense':>9}{'limit':>7}{'TFLOP/s':>9}{'GB/s':>8}  dispatch"
    print(head)
    for r in rows:
        semi = f"{r['semi_ms']:10.4f}" if "semi_ms" in r else f"{'-':>10}"
        print(f"{r['out']:>5} x {r['in']:<5} {r['tokens']:>5} {r['variant']:<10}{r['dense_ms']:10.4f}{semi}"
              f"{r['ours_ms']:10.4f}{r['speedup_vs_dense']:9.2f}{r['bytes_limit']:7.2f}{r['tflops']:9.2f}"
              f"{r['gbs']:8.0f}  {r['dispatch']}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="one tiny size under the Triton interpreter")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--no-flush", action="store_true", help="keep L2 warm between reps")
    ap.add_argument("--no-graph", action="store_true", help="time eager launches instead of CUDA graph replays")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/kernels_<gpu>.json)")
    ap.add_argument("--write", action="store_true", help="with --cpu-smoke: write the JSON into bench/results")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke or not _cuda()
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    import torch

    if smoke:
        device, label, reps = "cpu", "cpu-interpreter", 1
        cases = [(*SMOKE["shape"], t, v) for t in SMOKE["tokens"] for v in VARIANTS]
    else:
        device, reps = "cuda", args.reps
        label = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
        cases = [(o, i, t, v) for shapes in SHAPES.values() for (o, i) in shapes for t in TOKENS for v in VARIANTS]
    rows = []
    for o, i, t, v in cases:
        rows.append(run_case(o, i, t, v, device, torch.bfloat16, reps, not args.no_flush, not args.no_graph))
        print(f"{o}x{i} T={t} {v}: ours {rows[-1]['ours_ms']:.4f} ms", file=sys.stderr)
    print_table(rows)
    result = {"device": label, "dtype": "bfloat16", "smoke": smoke, "torch": torch.__version__,
              "flush_l2": not args.no_flush, "cuda_graph": not args.no_graph, "rows": rows}
    if not smoke or args.write or args.out:
        path = Path(args.out or ROOT / "bench" / "results" / f"kernels_{label}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"results -> {path}", file=sys.stderr)
    return result


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
