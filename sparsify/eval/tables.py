"""Readable rich tables for `sparsify eval` and `sparsify info`, kept within 100 columns.

Module names are long and mostly repeated (``model.layers.17.self_attn.q_proj.weight``), so a
name is split at its block index into the block list, the index and the rest: the table shows
the block (``17``, or ``vision.3`` when a model has several block lists) and the rest
(``self_attn.q_proj``), and says the block list once in the caption.
"""
from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text

from sparsify.eval.size import format_label, size_summary

REST_WIDTH = 26
GENERIC = {"model", "encoder", "decoder", "layers", "layer", "blocks", "block", "h", "transformer"}


def split_name(name: str) -> tuple[str, int | None, str]:
    """``a.b.12.c.d.weight`` -> (``a.b``, 12, ``c.d``): block list, block index, rest (no .weight).

    A name with no numeric component (outside the blocks) gives ("", None, name).
    """
    parts = name.removesuffix(".weight").split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), int(part), ".".join(parts[i + 1:])
    return "", None, ".".join(parts)


def group_labels(prefixes: list[str]) -> dict[str, str]:
    """Short labels for block lists: "" when there is one; else its first non-generic word."""
    unique = list(dict.fromkeys(prefixes))
    if len(unique) <= 1:
        return {p: "" for p in unique}
    labels = {}
    for p in unique:
        words = [w.removesuffix("_model") for w in p.split(".") if w not in GENERIC] or [p]
        labels[p] = words[0] + "."
    return labels if len(set(labels.values())) == len(unique) else {p: p + "." for p in unique}


def block_order(names: list[str]) -> list[str]:
    """``names`` by block list (in order of first appearance), then block index as a number (0, 1, 2, ..., 10,
    not 0, 1, 10, 11, ... as a bare file's sorted keys come), keeping the given order inside a block."""
    first: dict[str, int] = {}
    for n in names:
        first.setdefault(split_name(n)[0], len(first))

    def key(name: str) -> tuple[int, int]:
        prefix, index, _ = split_name(name)
        return first[prefix], -1 if index is None else index

    return sorted(names, key=key)


def ellipsize(text: str, width: int = REST_WIDTH) -> str:
    """Cut the middle of ``text`` to fit ``width``, keeping its start and informative tail."""
    if len(text) <= width:
        return text
    tail = width // 2
    return text[:width - tail - 1] + "…" + text[-tail:]


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _kv_table(title: str) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold", max_width=76)
    return table


def _scheme(cfg: dict) -> str:
    scheme = str(cfg.get("scheme", "?"))
    if ":" in scheme and not scheme.startswith("block"):
        return scheme
    per = f" per {cfg['per']}" if scheme == "unstructured" and cfg.get("per") else ""
    return f"{scheme}, {cfg.get('sparsity', 0):.0%}{per}"


def _calibration(m: dict) -> str:
    c = m.get("calibration")
    if not c:
        return "none (data-free method)"
    tokens = f", {c['tokens']:,} tokens" if c.get("tokens") else ""
    return f"{c['source']}: {c['samples']} samples x {c['seq_len']} (seed {c['seed']}{tokens})"


def quant_label(m: dict) -> str:
    """A manifest's quantization in words: ``int4 (group 128, symmetric)``, ``int8 (per channel, ...)``, ``none``."""
    q = m.get("quant") or {}
    kind = q.get("kind") or m["config"].get("quant") or "none"
    if kind == "none":
        return "none"
    bits = [f"group {q['group_size']}" if q.get("group_size") else "per channel",
            "symmetric" if q.get("symmetric", True) else "asymmetric"]
    if q.get("activations"):
        bits.append(f"activations {q['activations']}")
    return f"{kind} ({', '.join(bits)})"


SELECT_WORDS = {"max": "one selection per kv head (highest attention probability under any of its query heads)",
                "union": "one selection per kv head (its query heads' rankings merged)",
                "sum": "one selection per kv head (summed scores)", "head": "one selection per query head"}


GRID_WORDS = {"channel": " (a calibrated grid per channel)", "token": " (a grid per token)"}


def attention_label(section: dict) -> str:
    """A manifest's Double Sparsity section in words: statistic, channels, tokens, kept tokens, dense blocks."""
    c = section["config"]
    tokens = c["tokens"] if isinstance(c["tokens"], int) else f"{c['tokens']:g} of the context"
    chosen = section["statistic"]
    sel = section.get("selection") or {}
    if sel.get("losses"):
        chosen += " (auto; KL " + ", ".join(f"{k} {v:.3g}" for k, v in sel["losses"].items()) + ")"
    dense = section.get("dense_blocks") or []
    return (f"double sparsity: {chosen} channels, {section['channels']} of {section['head_dim']} per kv head at "
            f"{c['label_bits']} bits{GRID_WORDS.get(c.get('label_scale', 'token')) if c['label_bits'] < 16 else ''}; "
            f"{tokens} tokens per query ({c['sink']} sink + {c['recent']} recent kept), "
            f"{SELECT_WORDS.get(c.get('select'), c.get('select'))}; "
            + (f"block{'s' if len(dense) > 1 else ''} {dense[0]}{'' if len(dense) == 1 else f'-{dense[-1]}'} dense"
               if dense else "every block sparse"))


def _header(m: dict) -> Table:
    src, cfg = m.get("source", {}), m.get("config", {})
    head = _kv_table("sparsify artifact")
    kind = " / ".join(str(v) for v in (src.get("family"), src.get("model_type")) if v) or "bare weights"
    head.add_row("source", src.get("alias") or ellipsize(str(src.get("path", "?")), 76))
    head.add_row("model", kind)
    args = ", ".join(f"{k}={v}" for k, v in (cfg.get("method_args") or {}).items())
    head.add_row("method", f"{cfg.get('method', '?')}" + (f" ({args})" if args else ""))
    plan = m.get("plan") or {}
    if cfg.get("method") != "none":
        head.add_row("scheme (flags)" if plan.get("rules") else "scheme", _scheme(cfg))
    if plan.get("rules"):
        head.add_row("plan", f"{plan.get('source') or 'inline'}: {len(plan['rules'])} rule(s) over the flags")
    if m.get("allocation"):
        a = m["allocation"]
        head.add_row("allocation", f"{a['name']} ({', '.join(f'{k}={v}' for k, v in a.get('options', {}).items())}), "
                                   f"target {a.get('target', 0):.1%} over {len(a.get('groups', {}))} groups")
    head.add_row("quant", quant_label(m))
    if m.get("attention"):
        head.add_row("attention", attention_label(m["attention"]))
    head.add_row("calibration", _calibration(m))
    for key in ("targets", "ignore"):
        if cfg.get(key):
            head.add_row(key, ", ".join(cfg[key]))
    if m.get("distill"):
        head.add_row("distill", ", ".join(f"{k}={v}" for k, v in m["distill"].items() if not isinstance(v, dict)))
    t = m.get("timing") or {}
    if t:
        head.add_row("timing", f"{t.get('prune_s', 0):.1f} s, peak RSS {t.get('peak_rss_mb', 0):.0f} MB")
    head.add_row("written", f"{m.get('created', '?')} by sparsify {m.get('sparsify_version', '?')}")
    return head


def _tensor_table(m: dict) -> Table:
    names = block_order(list(m["tensors"]))
    split = {n: split_name(n) for n in names}
    labels = group_labels([split[n][0] for n in names if split[n][1] is not None])
    lists = ", ".join(f"{p}.N" for p in labels) or "-"
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), caption=f"blocks: {lists}", caption_justify="left")
    for col in ("block", "tensor", "format", "shape"):
        table.add_column(col, no_wrap=True)
    for col in ("sparsity", "packed", "dense", "ratio"):
        table.add_column(col, justify="right", no_wrap=True)
    for name in names:
        e, (prefix, index, rest) = m["tensors"][name], split[name]
        block = "-" if index is None else f"{labels[prefix]}{index}"
        table.add_row(block, ellipsize(rest), format_label(e), "x".join(map(str, e["shape"])),
                      f"{e['sparsity']:.1%}", human_bytes(e["bytes"]), human_bytes(e["dense_bytes"]),
                      f"{e['bytes'] / max(1, e['dense_bytes']):.3f}")
    tot = m["totals"]
    table.add_section()
    table.add_row("total", f"{tot['targets']} tensors", "", "", f"{tot['sparsity']:.1%}",
                  human_bytes(tot["packed_bytes"]), human_bytes(tot["dense_bytes"]), f"{tot['ratio']:.3f}")
    return table


def _footer(m: dict) -> Text:
    s = size_summary(m)
    lines = []
    if s["disk_bytes"] is not None:
        lines.append(f"weight files on disk: {human_bytes(s['disk_bytes'])} ({s['disk_bytes']:,} B), "
                     f"{s['disk_ratio']:.3f} of the same files stored dense ({human_bytes(s['dense_disk_bytes'])})")
    skipped = m.get("skipped") or {}
    if skipped and m.get("config", {}).get("method") == "none" and len(set(skipped.values())) == 1:
        lines.append(f"{len(skipped)} target layers: {next(iter(skipped.values()))}")
    else:
        for name, reason in skipped.items():
            lines.append(f"skipped {ellipsize(name, 48)}: {reason}")
    lines += [f"warning: {w}" for w in m.get("warnings") or []]
    return Text("\n".join(lines))


def info_table(manifest: dict) -> list:
    """`sparsify info`: the run's header, the allocation per group (if any), a per-tensor table with
    totals, and the files' bytes."""
    from sparsify.eval.allocation import allocation_summary, allocation_table

    summary = allocation_summary(manifest)
    return [_header(manifest), *([allocation_table(summary)] if summary else []), _tensor_table(manifest),
            _footer(manifest)]


METRIC_LABELS = {"kl": "KL(baseline||this) {:.4f} nats/token", "top1": "same top-1 {:.1%}"}


def _agreement_row(a: dict) -> str:
    metrics = ", ".join(METRIC_LABELS.get(k, k + "={:.4f}").format(v) for k, v in a.items() if isinstance(v, float))
    counted = next((f"{a[k]:,} {k}" for k in ("positions", "samples") if k in a), "")
    return f"{metrics} over {counted}" if counted else metrics


def _accuracy_row(a: dict) -> str:
    """Top-1 / top-5 on labelled images (dense beside them), and agreement with the dense top-1."""
    parts = [f"top-1 {a['top1']:.1%}, top-5 {a['top5']:.1%}"] if "top1" in a else []
    if "baseline" in a:
        parts.append(f"dense {a['baseline']['top1']:.1%} / {a['baseline']['top5']:.1%}")
    if "agreement_top1" in a:
        parts.append(f"same top-1 as dense {a['agreement_top1']:.1%}")
    classes = f", classes by {a['classes']}" if a.get("classes") else ""
    return "; ".join(parts) + f" over {a['images']:,} images ({a['data']}{classes})"


def _zero_shot_row(z: dict) -> str:
    """Zero-shot top-1 / top-5 against the class captions, the dense model's beside them."""
    text = _accuracy_row({**z, "classes": None})
    captions = f'"{z["template"]}"' if z.get("template") else "their own captions"
    return text.removesuffix(")") + f", {z['classes']} captions: {captions})"


def eval_table(result: dict) -> Table:
    """`sparsify eval`: one line per measured quantity of an `evaluate` result."""
    r = result
    table = _kv_table(f"sparsify eval {ellipsize(str(r['model']), 60)}")
    table.add_row("family / task", f"{r['family']} / {r['task']}")
    if "perplexity" in r:
        p = r["perplexity"]
        table.add_row("perplexity", f"{p['perplexity']:.3f} (nll {p['nll']:.4f}); {p['data']} {p['split']} text, "
                                    f"{p['windows']} x {p['seq_len']} tokens")
    base = r.get("baseline") or {}
    if base:
        table.add_row("baseline", f"{base['model']}" + (" (the source in the manifest; --no-baseline skips it)"
                                                        if base["from"] == "manifest" else ""))
    if "perplexity" in base:
        table.add_row("  perplexity", f"{base['perplexity']['perplexity']:.3f} dense on the same windows; "
                                      f"this / dense = {base['ratio']:.3f}x")
    if "agreement" in r:
        table.add_row("  agreement" if base else f"vs {ellipsize(str(r['agreement']['baseline']), 24)}",
                      _agreement_row(r["agreement"]))
    if "accuracy" in r:
        table.add_row("accuracy", _accuracy_row(r["accuracy"]))
    if "passkey" in r:
        p = r["passkey"]
        table.add_row("passkey", f"{p['accuracy']:.1%} ({p['correct']} of {p['trials']} trials, {p['seq_len']} tokens, "
                                 f"seed {p['seed']})")
    if "passkey" in base:
        table.add_row("  passkey", f"{base['passkey']['accuracy']:.1%} dense on the same prompts")
    if "attention" in r:
        kv = r["attention"]["kv_bytes"]
        layer = kv["per_sparse_layer"]
        table.add_row("KV bytes / token", f"{layer['sparse']:,} vs {layer['dense']:,} dense per sparse layer = "
                                          f"{layer['ratio']:.3f} (k {kv['k']} of {kv['context']} tokens, "
                                          f"{kv['channels']} label channels at {kv['label_bits']} bits, "
                                          f"fp16 cache); whole model {kv['model']['ratio']:.3f}")
    if "zero-shot" in r:
        table.add_row("zero-shot", _zero_shot_row(r["zero-shot"]))
    s = r["size"]
    if s["layers"]:
        spars = [v["sparsity"] for v in s["layers"].values()]
        table.add_row("sparsity", f"{s['sparsity']:.2%} over {s['count']} layers "
                                  f"(per layer {min(spars):.1%} .. {max(spars):.1%})")
    b = r.get("bytes")
    if b:
        table.add_row("packed bytes", f"{human_bytes(b['packed_bytes'])} vs {human_bytes(b['dense_bytes'])} dense "
                                      f"= {b['ratio']:.3f} ({b['targets']} tensors)")
        if b["disk_bytes"] is not None:
            table.add_row("on disk", f"{human_bytes(b['disk_bytes'])} vs {human_bytes(b['dense_disk_bytes'])} "
                                     f"stored dense = {b['disk_ratio']:.3f}")
    for path in r.get("report_files", []):
        table.add_row("report", str(path))
    if r.get("note"):
        table.add_row("note", r["note"])
    return table
