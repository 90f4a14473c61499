"""Kernel benchmark: 2:4 packed matmuls (ours, Triton) vs dense torch and torch's semi-structured path.

Shapes (out, in) from SmolLM2-135M, Llama-7B and ViT-B; token counts 1..4096. Per case: median
time (CUDA events), dense-equivalent TFLOP/s (2*T*in*out / t), GB/s of the bytes actually moved
(packed weight + x + y), ratio to dense, and the bytes limit (dense bytes / packed bytes moved),
the ceiling for a memory-bound kernel. Writes bench/results/kernels_<gpu>.json.

    python bench/kernels.py                 # on a GPU: the full table
    python bench/kernels.py --cpu-smoke     # no GPU: one tiny case under TRITON_INTERPRET=1 (kept tested)
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
          "llama7b": [(4096, 4096), (11008, 4096), (4096, 11008)], "vit-b": [(3072, 768), (768, 3072)]}
TOKENS = [1, 16, 64, 256, 1024, 4096]
VARIANTS = ["bf16", "int8", "int4-g128", "w8a8"]


def make_weight(out: int, inp: int, variant: str, device, dtype):
    """A random 2:4 weight packed for ``variant``: (tensors, attrs, dense weight in ``dtype``)."""
    import torch

    from sparsify import formats
    from sparsify.quant import rtn
    from sparsify.quant.spec import QuantSpec

    w = torch.randn(out, inp)
    keep = (torch.rand(out, inp // 4, 4).argsort(-1) < 2).view(out, inp)
    w = torch.where(keep, w, 0.0)
    spec = {"bf16": None, "int8": QuantSpec("int8"), "int4-g128": QuantSpec("int4", 128),
            "w8a8": QuantSpec.parse("w8a8")}[variant]
    params = None
    if spec is not None:
        w, params = rtn.fake_quantize(w, spec)
    tensors, attrs = formats.pack("nm", w.to(dtype) if spec is None else w, n=2, m=4, quant=params)
    return {k: v.to(device) for k, v in tensors.items()}, attrs, w.to(dtype).to(device)


def time_ms(fn, device: str, reps: int) -> float:
    import time

    import torch

    for _ in range(2):
        fn()
    if device == "cuda":
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run_case(out, inp, tokens, variant, device, dtype, reps):
    import torch
    import torch.nn.functional as F

    from sparsify import kernels
    from sparsify.kernels import IMPLS

    tensors, attrs, dense = make_weight(out, inp, variant, device, dtype)
    x = torch.randn(tokens, inp, device=device, dtype=dtype)
    name = "triton-w8a8" if variant == "w8a8" else "triton-nm"
    row = {"out": out, "in": inp, "tokens": tokens, "variant": variant, "dispatch": kernels.kernel_name(x, "nm", attrs)}
    row["dense_ms"] = time_ms(lambda: F.linear(x, dense), device, reps)
    row["ours_ms"] = time_ms(lambda: IMPLS[name](x, "nm", tensors, attrs, None), device, reps)
    if variant == "bf16" and device == "cuda":
        try:
            row["semi_ms"] = time_ms(lambda: IMPLS["semi-structured"](x, "nm", tensors, attrs, None), device, reps)
        except Exception as e:  # noqa: BLE001 (unsupported shape / GPU: report, do not fail the table)
            row["semi_error"] = str(e).splitlines()[0][:120]
    packed = sum(t.numel() * t.element_size() for t in tensors.values())
    act = (tokens * inp + tokens * out) * x.element_size()
    row["tflops"] = 2 * tokens * inp * out / (row["ours_ms"] * 1e-3) / 1e12
    row["gbs"] = (packed + act) / (row["ours_ms"] * 1e-3) / 1e9
    row["speedup_vs_dense"] = row["dense_ms"] / row["ours_ms"]
    row["bytes_limit"] = (dense.numel() * dense.element_size() + act) / (packed + act)
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="one tiny case under the Triton interpreter")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/kernels_<gpu>.json)")
    ap.add_argument("--write", action="store_true", help="with --cpu-smoke: also write the JSON")
    args = ap.parse_args(argv)
    import torch

    smoke = args.cpu_smoke or not torch.cuda.is_available()
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype, label = "cpu", torch.float32, "cpu-interpreter"
        cases = [(24, 64, t, v) for t in (1, 3) for v in VARIANTS]
        reps = 1
    else:
        device, dtype = "cuda", torch.bfloat16
        label = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
        cases = [(o, i, t, v) for shapes in SHAPES.values() for (o, i) in shapes for t in TOKENS for v in VARIANTS]
        reps = args.reps
    rows = []
    for o, i, t, v in cases:
        rows.append(run_case(o, i, t, v, device, dtype, reps))
        r = rows[-1]
        print(f"{o:>6}x{i:<6} T={t:<5} {v:<10} dense {r['dense_ms']:8.3f} ms  ours {r['ours_ms']:8.3f} ms  "
              f"x{r['speedup_vs_dense']:.2f} (limit x{r['bytes_limit']:.2f})"
              + (f"  semi {r['semi_ms']:.3f} ms" if "semi_ms" in r else ""), file=sys.stderr)
    result = {"device": label, "dtype": str(dtype), "smoke": smoke, "torch": torch.__version__, "rows": rows}
    if not smoke or args.write or args.out:
        path = Path(args.out or ROOT / "bench" / "results" / f"kernels_{label}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"results -> {path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
