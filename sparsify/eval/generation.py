"""End-to-end speed for `sparsify bench`: the packed artifact against the dense source model it was
pruned from, both loaded in this process and run interleaved (each repetition runs one model, then
the other, in a shuffled order), medians reported.

causal LMs: prefill tokens/s (batch 1, a ``prompt_len``-token prompt) and decode tokens/s with the KV
cache at batch 1 and 8 (``decode_tokens`` greedy steps after an untimed prefill of the prompt);
other families: items/s of whole forwards (images/s for image models) at batch 1 and 32 (or ``batches``).
Memory, per model: the bytes of its parameters and buffers, plus, for the artifact, what the kernel
dispatch keeps beside its packed weights (`kernels.cache_bytes`); on CUDA the peak allocated bytes
of its own runs; on CPU the process's peak resident memory over each model's runs (both models are
resident then, so it is a bound, not a share).
"""
from __future__ import annotations

import random
import statistics
import time

import torch

DECODE_BATCHES = (1, 8)
FORWARD_BATCHES = (1, 32)
UNITS = {"text": "sequences/s", "image": "images/s", "image-text": "pairs/s"}


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen and t.device.type != "meta":
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _decode_run(model, ids, steps: int, device: str) -> float:
    """Seconds for ``steps`` greedy decode steps after an (untimed) prefill of ``ids``."""
    out = model(input_ids=ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)  # (batch, 1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - t0


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _cases(loaded, prompt_len: int, decode_tokens: int, device: str, batches=FORWARD_BATCHES) -> list[tuple]:
    """(phase, batch, unit count per run, run(model) -> seconds) for this family."""
    cfg = getattr(loaded.config, "text_config", None) or loaded.config
    vocab, size = getattr(cfg, "vocab_size", 2), loaded.image_size or 32
    g = torch.Generator().manual_seed(0)
    if loaded.family.name == "causal-lm":
        ids = {b: torch.randint(0, vocab, (b, prompt_len), generator=g).to(device) for b in DECODE_BATCHES}
        cases = [("prefill", 1, prompt_len, lambda m: _timed(lambda: m(input_ids=ids[1]), device))]
        return cases + [("decode", b, b * decode_tokens, lambda m, b=b: _decode_run(m, ids[b], decode_tokens, device))
                        for b in DECODE_BATCHES]
    make = {"text": lambda b: {"input_ids": torch.randint(0, vocab, (b, prompt_len), generator=g)},
            "image": lambda b: {"pixel_values": torch.randn(b, 3, size, size, generator=g)},
            "image-text": lambda b: {"input_ids": torch.randint(0, vocab, (b, min(prompt_len, 64)), generator=g),
                                     "pixel_values": torch.randn(b, 3, size, size, generator=g)}}[loaded.family.inputs]
    inputs = {b: {k: v.to(device) for k, v in make(b).items()} for b in batches}
    return [("forward", b, b, lambda m, b=b: _timed(lambda: m(**inputs[b]), device)) for b in batches]


def _warm_up(cases, models: dict, device: str) -> dict:
    """One run of every case per model (caches, allocator, the C kernel's first build), measuring memory:
    the dispatch cache bytes built for the model and, on CUDA, the peak allocated bytes of its runs; on
    CPU, how far its runs raised the process's resident memory (activations, KV cache, transient weights
    and those caches)."""
    from sparsify import kernels
    from sparsify.resources import PeakRss

    memory = {}
    for name, m in models.items():
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        cache = sum(kernels.cache_bytes().values())
        with PeakRss() as rss:
            start = rss.proc.memory_info().rss
            for _, _, _, run in cases:
                run(m)
        built = sum(kernels.cache_bytes().values()) - cache
        memory[name] = {"weights_bytes": held_bytes(m), "dispatch_cache_bytes": built}
        if device.startswith("cuda"):
            memory[name]["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        else:
            memory[name]["rss_growth_bytes"] = max(0, rss.peak - start)
    return memory


def generation(loaded, models: dict, *, prompt_len: int, decode_tokens: int, device: str, reps: int,
               baseline: str = "dense", batches=FORWARD_BATCHES) -> dict:
    """Throughput of each model in ``models`` (name -> module, one of them ``baseline``) for every case of
    the family, interleaved. Returns {"rows": [{"phase", "batch", "tokens", "<name>_per_s"...,
    "speedup": {name: rate / baseline's rate}}], "memory": {name: {...}}, "unit", ...}."""
    from sparsify.resources import peak_rss_mb

    cases = _cases(loaded, prompt_len, decode_tokens, device, tuple(batches))
    times = {(phase, b, name): [] for phase, b, _, _ in cases for name in models}
    with torch.inference_mode():
        memory = _warm_up(cases, models, device)
        for _ in range(reps):
            for phase, b, _, run in cases:
                order = list(models)
                random.shuffle(order)
                for name in order:
                    times[(phase, b, name)].append(run(models[name]))
    rows = []
    for phase, b, units, _ in cases:
        rate = {name: units / statistics.median(times[(phase, b, name)]) for name in models}
        rows.append({"phase": phase, "batch": b, "tokens": {"prefill": prompt_len, "decode": decode_tokens}.get(phase),
                     **{f"{n}_per_s": r for n, r in rate.items()},
                     "speedup": {n: r / rate[baseline] for n, r in rate.items() if n != baseline}})
    memory["process_peak_rss_bytes"] = int(peak_rss_mb() * 2**20)
    unit = "tokens/s" if loaded.family.name == "causal-lm" else UNITS[loaded.family.inputs]
    return {"rows": rows, "memory": memory, "unit": unit, "reps": reps, "prompt_len": prompt_len,
            "decode_tokens": decode_tokens if loaded.family.name == "causal-lm" else None}
