"""`evaluate()`: the `sparsify eval` command as a library call.

Opens an artifact or a plain model, runs its task (perplexity for causal LMs; agreement with a
dense baseline when one is given), and always reports measured sparsity per layer and, for
artifacts, packed vs dense bytes. Returns a JSON-able dict.
"""
from __future__ import annotations

import torch

from sparsify import progress
from sparsify.errors import UserError
from sparsify.eval.agreement import BY_FAMILY


def _weights(loaded, manifest) -> dict[str, torch.Tensor]:
    from sparsify.runtime.densify import sparse_modules

    if manifest is not None:
        return {name: m.dense_weight() for name, m in sparse_modules(loaded.model).items()}
    from sparsify.models.layout import find_targets

    names = [n for group in find_targets(loaded.model).values() for n in group]
    return {n: loaded.model.get_submodule(n).weight.detach() for n in names}


def _perplexity(loaded, opts) -> dict:
    from sparsify.calibrate.data import eval_windows, load_text
    from sparsify.eval.perplexity import perplexity

    if loaded.family.name != "causal-lm":
        raise UserError(f"perplexity needs a causal LM; this is a {loaded.family.name}: use --task agreement")
    windows = eval_windows(loaded.tokenizer, load_text(opts["data"] or "builtin", "eval"), opts["seq_len"],
                           opts["max_windows"])
    with progress.bar("perplexity", total=len(windows)) as advance:
        result = perplexity(loaded.model, windows, opts["batch_size"], progress=advance)
    return {**result, "data": opts["data"] or "builtin", "split": "eval" if not opts["data"] else "file"}


def _agreement_batches(loaded, opts) -> list[dict]:
    from sparsify.calibrate.batches import _normalize
    from sparsify.calibrate.data import eval_windows, load_image_text, load_images, load_text

    n = min(8, opts["max_windows"])
    if loaded.family.inputs == "text":
        max_len = getattr(loaded.config, "max_position_embeddings", None) or opts["seq_len"]
        ids = eval_windows(loaded.tokenizer, load_text(opts["data"] or "builtin", "eval"),
                           min(opts["seq_len"], max_len), n)
        return [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in ids.split(opts["batch_size"])]
    if loaded.family.inputs == "image":
        images, _ = load_images("builtin", loaded.image_size, n, seed=1)
        return [{"pixel_values": _normalize(images, loaded.image_mean, loaded.image_std)}]
    images, captions = load_image_text("builtin", loaded.image_size, n, seed=1)
    text = loaded.tokenizer(captions, padding=True, truncation=True, return_tensors="pt",
                            max_length=loaded.config.text_config.max_position_embeddings)
    return [{"pixel_values": _normalize(images, loaded.image_mean, loaded.image_std), **text}]


def _agreement(loaded, opts) -> dict:
    from sparsify.runtime.load import open_model

    if not opts["baseline"]:
        raise UserError("--task agreement needs --baseline MODEL (the dense model to compare with)")
    base, _ = open_model(opts["baseline"], device=opts["device"])
    batches = [{k: v.to(opts["device"]) for k, v in b.items()} for b in _agreement_batches(loaded, opts)]
    return {"baseline": opts["baseline"], **BY_FAMILY[loaded.family.name](loaded.model, base.model, batches)}


TASKS = {"perplexity": _perplexity, "agreement": _agreement}


def evaluate(arg: str, *, task: str | None = None, data: str | None = None, baseline: str | None = None,
             seq_len: int = 512, max_windows: int = 32, batch_size: int = 4, device: str = "cpu") -> dict:
    from sparsify.eval.size import size_summary, weight_sparsity
    from sparsify.runtime.load import open_model

    if task not in (None, "size", *TASKS):
        raise UserError(f"--task {task!r}: choose one of perplexity, agreement, size")
    loaded, manifest = open_model(arg, device=device)
    if task is None:
        task = "perplexity" if loaded.family.name == "causal-lm" else ("agreement" if baseline else "size")
    opts = {"data": data, "baseline": baseline, "seq_len": seq_len, "max_windows": max_windows,
            "batch_size": batch_size, "device": device}
    result = {"model": str(arg), "family": loaded.family.name, "task": task}
    for name in [task] + (["agreement"] if baseline and task != "agreement" else []):
        if name in TASKS:
            result[name] = TASKS[name](loaded, opts)
    size = weight_sparsity(_weights(loaded, manifest))
    if manifest is not None:
        size.update(size_summary(manifest, arg))
    result["size"] = size
    return result
