"""`evaluate()`: the `sparsify eval` command as a library call.

Opens an artifact or a plain model, runs its task (perplexity for causal LMs; agreement with a
dense baseline when one is given), and always measures sparsity per targeted layer and overall,
plus, for artifacts, packed vs dense bytes from the manifest. Returns a JSON-able dict:

    {"model", "family", "task", "artifact": bool,
     "perplexity": {..., "data", "split"},        # causal LMs
     "baseline": {"model", "from", "perplexity", "ratio"},  # with a baseline (perplexity: causal LMs)
     "agreement": {"baseline", "inputs", ...},    # with a baseline
     "accuracy": {"top1", "top5", "agreement_top1", ...},  # image classifiers, --task accuracy
     "zero-shot": {"top1", "top5", "template", "baseline", "agreement_top1", ...},  # clip family, --task zero-shot
     "passkey": {"accuracy", "correct", "trials", ...},   # causal LMs, --task passkey
     "attention": {"kv_bytes": ...},              # Double Sparsity artifacts: KV bytes read per decoded token
     "size": {"layers": {module: {"numel", "nnz", "sparsity"}}, "count", "numel", "nnz", "sparsity"},
     "bytes": size_summary(manifest),             # artifacts
     "note": ...}                                 # artifacts on CPU: the packed runtime is slow there

The baseline, the dense model to compare with, is ``--baseline MODEL`` or, for an artifact, the source
its manifest records when that directory still exists (``from``: "argument" / "manifest"); ``--no-baseline``
skips it. It costs one more model load and evaluation (about twice the time of the artifact's alone):
the number beside a pruned model's perplexity is what makes it readable. Its perplexity runs on the same
windows; ``ratio`` = pruned / dense perplexity. Agreement's ``kl`` is KL(baseline || model), the mean
over token positions (each a distribution over the vocabulary), in nats.
"""
from __future__ import annotations

from sparsify.errors import UserError
from sparsify.eval.agreement import BY_FAMILY

AGREEMENT_SAMPLES = 8
IMAGE_SEED = 1  # the built-in images have no held-out split: draw with another seed than calibration's 0


def _context_len(loaded, seq_len: int) -> int:
    """``seq_len`` capped at the text model's position limit (CLIP: its text tower's)."""
    config = getattr(loaded.config, "text_config", loaded.config)
    limit = getattr(config, "max_position_embeddings", None)
    return min(seq_len, limit) if limit else seq_len


def _text_source(data: str | None) -> tuple[str, str]:
    """(source, split) as recorded: the built-in held-out split, or the whole of a user's file."""
    return (data, "whole file") if data else ("builtin", "eval")


def _perplexity(loaded, opts, label: str = "perplexity") -> dict:
    from sparsify.calibrate.data import eval_windows, load_text
    from sparsify.eval.perplexity import perplexity

    if _context_len(loaded, opts["seq_len"]) < opts["seq_len"]:
        raise UserError(f"--seq-len {opts['seq_len']} is longer than this model's context "
                        f"({_context_len(loaded, opts['seq_len'])}): pass a smaller --seq-len")
    source, split = _text_source(opts["data"])
    windows = eval_windows(loaded.tokenizer, load_text(source, "eval"), opts["seq_len"], opts["max_windows"])
    with opts["progress"](label, len(windows)) as advance:
        result = perplexity(loaded.model, windows, opts["batch_size"], progress=advance)
    return {**result, "data": source, "split": split}


def _agreement_batches(loaded, opts) -> tuple[list[dict], dict]:
    """Held-out inputs for the agreement task, and what they were (recorded in the result)."""
    from sparsify.calibrate.batches import build_batches, text_padding
    from sparsify.calibrate.data import eval_windows, load_text
    from sparsify.config import CalibConfig

    n = min(AGREEMENT_SAMPLES, opts["max_windows"])
    seq_len = _context_len(loaded, opts["seq_len"])
    if loaded.family.inputs == "text":
        source, split = _text_source(opts["data"])
        ids = eval_windows(loaded.tokenizer, load_text(source, "eval"), seq_len, n)  # (n, T)
        batches = [{"input_ids": c, "attention_mask": c.new_ones(c.shape)} for c in ids.split(opts["batch_size"])]
        return batches, {"data": source, "split": split, "windows": len(ids), "seq_len": seq_len}
    calib = CalibConfig(source=opts["data"] or "builtin", samples=n, seq_len=seq_len, seed=IMAGE_SEED,
                        batch_size=opts["batch_size"])
    padding = text_padding(loaded.model, loaded.tokenizer) if loaded.family.inputs == "image-text" else "longest"
    batches = build_batches(loaded.family.inputs, calib, tokenizer=loaded.tokenizer, image_size=loaded.image_size,
                            image_mean=loaded.image_mean, image_std=loaded.image_std, max_text_len=seq_len,
                            padding=padding)
    return batches, {"data": calib.source, "seed": IMAGE_SEED, "images": sum(len(b["pixel_values"]) for b in batches)}


def _baseline_model(loaded, opts):
    """The baseline, loaded once per evaluation (agreement and baseline perplexity share it)."""
    from sparsify.runtime.load import open_model

    if "base" not in opts:
        base, _ = open_model(opts["baseline"], device=opts["device"])
        if base.family.name != loaded.family.name:
            raise UserError(f"--baseline {opts['baseline']} is {_a(base.family.name)}, not {_a(loaded.family.name)}: "
                            "pass the dense model this one was pruned from")
        opts["base"] = base
    return opts["base"]


def _agreement(loaded, opts) -> dict:
    if not opts["baseline"]:
        raise UserError("--task agreement needs --baseline MODEL (the dense model to compare with)")
    base = _baseline_model(loaded, opts)
    batches, inputs = _agreement_batches(loaded, opts)
    batches = [{k: v.to(opts["device"]) for k, v in b.items()} for b in batches]
    metrics = BY_FAMILY[loaded.family.name](loaded.model, base.model, batches)
    if "kl" in metrics:
        metrics["kl_definition"] = "KL(baseline || model), mean over token positions, in nats"
    return {"baseline": str(opts["baseline"]), "inputs": inputs, **metrics}


def default_baseline(manifest: dict | None) -> str | None:
    """The source an artifact was pruned from, when it is still a runnable model directory (or file in one)."""
    from pathlib import Path

    path = ((manifest or {}).get("source") or {}).get("path")
    if not path:
        return None
    path = Path(path)
    directory = path.parent if path.suffix == ".safetensors" else path
    return str(path) if (directory / "config.json").is_file() else None


def _baseline(loaded, result: dict, opts, source: str) -> dict:
    """The baseline's own perplexity on the same windows (causal LMs) and the ratio to this model's."""
    out = {"model": str(opts["baseline"]), "from": source}
    if "perplexity" in result:
        base = _perplexity(_baseline_model(loaded, opts), opts, "perplexity (baseline)")
        out["perplexity"] = base
        out["ratio"] = result["perplexity"]["perplexity"] / base["perplexity"]
    if "passkey" in result:
        out["passkey"] = _passkey(_baseline_model(loaded, opts), opts, "passkey (baseline)")
    return out


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _size_only(loaded, opts) -> None:
    """The "size" task: nothing beyond the sparsity and bytes every evaluation reports."""
    return None


def _accuracy(loaded, opts) -> dict:
    """Top-1 / top-5 of an image classifier on a labelled folder, and agreement with the baseline (eval/accuracy.py)."""
    from sparsify.eval.accuracy import accuracy

    base = _baseline_model(loaded, opts).model if opts["baseline"] else None
    return accuracy(loaded, opts["data"], base, device=opts["device"])


def _zero_shot(loaded, opts) -> dict:
    """Zero-shot top-1 / top-5 of an image-text dual encoder against class captions, beside the baseline's (eval/zero_shot.py)."""
    from sparsify.eval.zero_shot import zero_shot

    base = _baseline_model(loaded, opts).model if opts["baseline"] else None
    return zero_shot(loaded, opts["data"], opts.get("template"), base, device=opts["device"])


def _passkey(loaded, opts, label: str = "passkey") -> dict:
    """Passkey retrieval accuracy over ``--trials`` seeded prompts of ``--seq-len`` tokens (eval/passkey.py)."""
    from sparsify.eval.passkey import passkey

    if _context_len(loaded, opts["seq_len"]) < opts["seq_len"]:
        raise UserError(f"--seq-len {opts['seq_len']} is longer than this model's context "
                        f"({_context_len(loaded, opts['seq_len'])}): pass a smaller --seq-len")
    with opts["progress"](label, opts["trials"]) as advance:
        return passkey(loaded.model, loaded.tokenizer, opts["seq_len"], opts["trials"], progress=advance)


TASKS = {"perplexity": _perplexity, "agreement": _agreement, "size": _size_only, "accuracy": _accuracy,
         "zero-shot": _zero_shot, "passkey": _passkey}
FAMILIES = {"perplexity": {"causal-lm"}, "agreement": set(BY_FAMILY), "size": None,  # None: any family
            "accuracy": {"image-classifier"}, "zero-shot": {"clip"}, "passkey": {"causal-lm"}}
SELF_COMPARED = {"zero-shot"}  # tasks that run the baseline on their own data (a class folder has no captions.txt for agreement)


def _measured_sparsity(loaded, manifest) -> dict:
    """Per-layer and overall sparsity of the targeted layers, counted in the loaded weights."""
    from sparsify.eval.size import overall, tensor_stats, weight_sparsity

    if callable(getattr(loaded.model, "weights", None)):  # a model that is no torch module tree (ONNX)
        layers = tensor_stats(loaded.model.weights())
    else:
        if manifest is not None:
            names = [e["module"] for e in manifest["tensors"].values()]
        else:
            from sparsify.models.layout import find_targets

            names = [n for group in find_targets(loaded.model).values() for n in group]
        layers = weight_sparsity(loaded.model, names)
    return {"layers": layers, **overall(layers)}


def _default_task(family: str, baseline: str | None) -> str:
    return "perplexity" if family == "causal-lm" else ("agreement" if baseline else "size")


def evaluate(arg: str, *, task: str | None = None, data: str | None = None, baseline: str | None = None,
             seq_len: int = 512, max_windows: int = 32, batch_size: int = 4, device: str = "cpu",
             progress_factory=None, auto_baseline: bool = True, template: str | None = None,
             trials: int = 20, max_memory: str | None = None) -> dict:
    """Evaluate an artifact directory or a plain model (path or alias); see the module docstring.

    Args:
        task: "perplexity" | "agreement" | "size" | "accuracy" | "zero-shot"; None picks by family (causal LM: perplexity;
            others: agreement with a baseline, else size only).
        data: held-out text (.txt / .jsonl) or image folder; None: the built-in evaluation data.
        baseline: the dense model to compare with; with a baseline, agreement is measured too, and for a
            causal LM its perplexity on the same windows.
        auto_baseline: for an artifact without ``baseline``, use the source its manifest records if it exists.
        template: --task zero-shot: the class caption with ``{}`` for the class folder's name.
        seq_len, max_windows, batch_size: perplexity windows (non-overlapping) and windows per forward;
            ``seq_len`` is also the passkey prompt's length (answer included).
        trials: passkey prompts (``task="passkey"``).
        max_memory: hold an artifact under this size, the rest offloaded to disk (`sparsify.runtime.offload`);
            no baseline then (the dense model would be loaded whole).
        progress_factory: callable(description, total) -> context manager yielding advance(n);
            default: sparsify.progress.bar.
    """
    from sparsify import progress
    from sparsify.kernels.cpu.note import cpu_note
    from sparsify.eval.size import size_summary
    from sparsify.runtime.load import open_model

    if task is not None and task not in TASKS:
        raise UserError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    if seq_len < 2 or max_windows < 1 or batch_size < 1 or trials < 1:
        raise UserError("--seq-len must be at least 2, and --windows, --batch-size and --trials positive")
    if max_memory is not None and baseline is not None:
        raise UserError("--max-memory holds the evaluated artifact alone under the cap: drop --baseline "
                        "(the dense model would be loaded whole)")
    loaded, manifest = open_model(arg, device=device, max_memory=max_memory, forward_tokens=batch_size * seq_len)
    auto_baseline = auto_baseline and max_memory is None
    family = loaded.family.name
    source = "argument" if baseline else "manifest"
    if baseline is None and auto_baseline and family in BY_FAMILY:
        baseline = default_baseline(manifest)
    task = task or _default_task(family, baseline)
    if template is not None and task != "zero-shot":
        raise UserError("--template only applies to --task zero-shot: drop it or pass --task zero-shot")
    for name in {task} | ({"agreement"} if baseline else set()):
        if FAMILIES[name] is not None and family not in FAMILIES[name]:
            raise UserError(f"--task {name} does not apply to {_a(family)} model: use --task "
                            f"{_default_task(family, baseline)}" + ("" if baseline else " or pass --baseline"))
    opts = {"data": data, "baseline": baseline, "seq_len": seq_len, "max_windows": max_windows,
            "batch_size": batch_size, "device": device, "progress": progress_factory or progress.bar,
            "template": template, "trials": trials}
    result = {"model": str(arg), "family": family, "task": task, "artifact": manifest is not None}
    for name in dict.fromkeys([task] + (["agreement"] if baseline and task not in SELF_COMPARED else [])):
        value = TASKS[name](loaded, opts)
        if value is not None:
            result[name] = value
    if baseline:
        result["baseline"] = _baseline(loaded, result, opts, source)
    result["size"] = _measured_sparsity(loaded, manifest)
    if manifest is not None and manifest.get("attention"):
        from sparsify.attention.artifact import kv_bytes_at

        result["attention"] = {"method": manifest["attention"]["method"], "statistic": manifest["attention"]["statistic"],
                               "simulation": "sparse attention at every query position over its causal prefix",
                               "kv_bytes": kv_bytes_at(manifest, seq_len)}
    if manifest is not None:
        from sparsify.eval.allocation import allocation_summary

        result["bytes"] = size_summary(manifest)
        if (allocation := allocation_summary(manifest)) is not None:
            result["allocation"] = allocation
        result["note"] = cpu_note(device, loaded.model)
    return result
