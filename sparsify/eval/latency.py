"""`sparsify bench`: time the packed artifact against its own dense twin, layer shape by layer shape
and for whole forwards (prefill and single-token decode), side by side in one process; then
end-to-end generation against the dense source model (`sparsify.eval.generation`).

The dense twin is the same model with every `SparseLinear` unpacked into a plain Linear, so the
ratio isolates what the packed weights and their kernels gain or lose. The bytes limit is
dense weight bytes / packed weight bytes: a memory-bound kernel cannot beat it.

On CPU, weights without a fast CPU path at decode (`sparsify.kernels.cpu.paths`: e.g. fp8, 4:8, or
unstructured weights too dense for CSR) rebuild their dense weight on every call unless
SPARSIFY_CPU_CACHE=1; `cpu_note` says how many, in one line, for `bench` and `eval` alike.
"""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsify import kernels
from sparsify.kernels.cpu.note import cpu_note  # noqa: F401  (eval and bench alike)

def timeit(fn, device: str, warmup: int = 2, reps: int = 7) -> float:
    """Median wall time of ``fn()`` in seconds (synchronising CUDA around each call)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _layer_rows(model, token_counts, device, reps) -> list[dict]:
    from sparsify.runtime.densify import sparse_modules

    rows, seen = [], set()
    for name, mod in sparse_modules(model).items():
        key = (mod.fmt, tuple(mod.attrs["shape"]), mod.attrs.get("quant"))
        if key in seen:
            continue
        seen.add(key)
        packed, dense = mod.packed(), mod.dense_weight()  # dense: (out, in)
        packed_bytes = sum(t.numel() * t.element_size() for t in packed.values())
        dense_bytes = dense.numel() * dense.element_size()
        for tokens in token_counts:
            x = torch.randn(tokens, mod.in_features, dtype=dense.dtype, device=device)  # (tokens, in)
            t_sparse = timeit(lambda: kernels.linear(x, mod.fmt, packed, mod.attrs), device, reps=reps)
            t_dense = timeit(lambda: F.linear(x, dense), device, reps=reps)
            rows.append({"layer": name, "format": mod.fmt, "quant": mod.attrs.get("quant"),
                         "shape": list(mod.attrs["shape"]), "tokens": tokens,
                         "kernel": kernels.kernel_name(x, mod.fmt, mod.attrs, packed),
                         "sparse_ms": t_sparse * 1e3, "dense_ms": t_dense * 1e3, "speedup": t_dense / t_sparse,
                         "bytes_limit": dense_bytes / packed_bytes})
    return rows


def _forward_rows(loaded, dense_model, prompt_len, device, reps) -> list[dict]:
    """Whole-model forwards: prefill of ``prompt_len`` tokens and, for causal LMs, one decode step."""
    from sparsify.tensors import to_device

    model, family = loaded.model, loaded.family
    size = loaded.image_size or 32
    vocab = getattr(getattr(loaded.config, "text_config", None) or loaded.config, "vocab_size", 2)
    inputs = {"text": {"input_ids": torch.randint(0, vocab, (1, prompt_len))},
              "image": {"pixel_values": torch.randn(1, 3, size, size)},
              "image-text": {"input_ids": torch.randint(0, vocab, (1, min(prompt_len, 64))),
                             "pixel_values": torch.randn(1, 3, size, size)}}[family.inputs]
    inputs = to_device(inputs, device)
    rows = []
    with torch.inference_mode():
        for label, m in (("sparse", model), ("dense", dense_model)):
            t = timeit(lambda: m(**inputs), device, warmup=1, reps=reps)
            rows.append({"phase": "prefill", "model": label, "tokens": prompt_len, "ms": t * 1e3})
            if family.name == "causal-lm":
                past = m(**inputs, use_cache=True).past_key_values
                nxt = inputs["input_ids"][:, -1:]

                def decode():  # one new token on a prompt_len cache, then drop it again
                    m(input_ids=nxt, past_key_values=past, use_cache=True)
                    past.crop(-1)

                t = timeit(decode, device, warmup=1, reps=reps)
                rows.append({"phase": "decode", "model": label, "tokens": 1, "ms": t * 1e3})
    return rows


def _dense_source(manifest: dict, device: str, twin):
    """The dense model the artifact was pruned from (its manifest's source), else its dense twin."""
    from sparsify.eval.run import default_baseline
    from sparsify.runtime.load import open_model

    source = default_baseline(manifest)
    if source is None:
        return twin, "dense twin (the artifact's source is gone: its weights unpacked, zeros kept)"
    return open_model(source, device=device)[0].model.eval(), source


def bench(artifact: str, *, token_counts=(1, 16, 128), prompt_len: int = 128, device: str = "cpu",
          reps: int = 7, decode_tokens: int = 32, generate: bool = True, save_costs: str | None = None,
          batches: tuple[int, ...] = (1, 32)) -> dict:
    """Time an artifact against its dense twin and its dense source.

    ``batches``: batch sizes of the end-to-end forwards (families other than causal LMs).
    ``save_costs``: also write the latency of every block-sparse layer shape against its kept tiles
    there (`sparsify.eval.costs`, at the largest of ``token_counts``).
    Returns {"layers": [...], "forward": [...], "generation": {...}, ...}."""
    from sparsify import progress
    from sparsify.eval import costs
    from sparsify.eval.generation import generation
    from sparsify.errors import UserError
    from sparsify.runtime.densify import densify, sparse_modules
    from sparsify.runtime.load import load_artifact

    if save_costs and not Path(save_costs).resolve().parent.is_dir():
        raise UserError(f"--save-costs {save_costs}: its directory does not exist: create it first")
    with progress.bar("bench", total=4) as step, progress.quiet():
        step(0, "loading the artifact and its dense twin")
        loaded, manifest = load_artifact(artifact, device=device)
        blocks = sorted({(tuple(m.attrs["shape"]), tuple(m.attrs["block"])) for m in sparse_modules(loaded.model).values()
                         if m.fmt == "bsr"})
        if save_costs and not blocks:
            raise UserError("--save-costs times block-sparse layers and this artifact has none: bench one pruned "
                            "with --scheme block:RxC")
        dense_model = densify(copy.deepcopy(loaded.model))
        step(1, f"timing each layer shape at {', '.join(map(str, token_counts))} tokens")
        layers = _layer_rows(loaded.model, token_counts, device, reps)
        step(1, "timing whole-model prefill" + (" and decode" if loaded.family.name == "causal-lm" else ""))
        forward = _forward_rows(loaded, dense_model, prompt_len, device, reps)
        gen = None
        if generate:
            step(1, "end-to-end generation against the dense source model")
            source, source_name = _dense_source(manifest, device, dense_model)
            del dense_model  # the twin is not timed again
            gen = generation(loaded, {"sparse": loaded.model, "dense": source}, prompt_len=prompt_len,
                             decode_tokens=decode_tokens, device=device, reps=reps, batches=batches)
            gen["dense_model"] = str(source_name)
        cost_file = None
        if save_costs:
            step(0, f"timing {len(blocks)} block-sparse layer shape(s) at {len(costs.KEPT)} kept fractions")
            cost_file = str(costs.save(costs.measure(blocks, max(token_counts), timeit, device, reps), save_costs))
        step(1, "done")
    by = {(r["phase"], r["model"]): r["ms"] for r in forward}
    ratios = {phase: by[(phase, "dense")] / by[(phase, "sparse")] for phase in ("prefill", "decode")
              if (phase, "sparse") in by}
    t = manifest["totals"]
    return {"artifact": str(artifact), "device": device, "torch_threads": torch.get_num_threads(),
            "layers": layers, "forward": forward, "forward_speedup": ratios, "generation": gen,
            "bytes_limit": t["dense_bytes"] / max(1, t["packed_bytes"]), "note": cpu_note(device, loaded.model),
            # memory the dispatch holds beside the packed weights (dense-cached / semi-structured / torch's
            # int8 / int4 / CSR copies), whether the CPU keeps dense copies, whether GPU thresholds are measured
            "dispatch_cache_bytes": kernels.cache_bytes(), "cpu_cache_dense": _cpu_cache(),
            "thresholds_measured": kernels.THRESHOLDS_MEASURED, "costs_file": cost_file}


def _cpu_cache() -> bool:
    from sparsify.kernels.cpu.paths import cache_dense

    return cache_dense()
