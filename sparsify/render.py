"""Rich renderings of the CLI's results (prune summary, bench and export tables).

Each function takes the JSON-able dict a library call returned and gives rich renderables, so
``--json`` and the tables always show the same numbers.
"""
from __future__ import annotations

from rich.table import Table

from sparsify.eval.tables import attention_label, quant_label


def prune_summary(m: dict, output: str) -> list:
    t = Table(title=f"sparsify prune -> {output}", show_header=False)
    cfg, tot = m["config"], m["totals"]
    scheme = cfg["scheme"] + (f" ({cfg['sparsity']:.0%})" if cfg["scheme"] == "unstructured" else "")
    t.add_row("method / scheme", "none (weights copied unchanged)" if cfg["method"] == "none"
              else f"{cfg['method']} / {scheme}")
    if m.get("attention"):
        t.add_row("attention", attention_label(m["attention"]))
    if cfg.get("quant", "none") != "none":
        t.add_row("quantization", quant_label(m))
    t.add_row("pruned layers", f"{tot['targets']} ({len(m.get('skipped', {}))} skipped)")
    t.add_row("sparsity (pruned layers)", f"{tot['sparsity']:.2%}")
    t.add_row("packed / dense bytes",
              f"{tot['packed_bytes'] / 1e6:.1f} MB / {tot['dense_bytes'] / 1e6:.1f} MB = {tot['ratio']:.3f}x")
    if m.get("calibration"):
        c = m["calibration"]
        t.add_row("calibration", f"{c['source']}: {c['samples']} x {c['seq_len']} tokens (seed {c['seed']})")
    if m.get("distill"):
        d = m["distill"]
        t.add_row("distillation", f"{d.get('steps')} steps ({d.get('mode')}), {d.get('wall_s', 0):.0f} s")
    formats: dict[str, int] = {}
    for e in m["tensors"].values():
        formats[e["format"]] = formats.get(e["format"], 0) + 1
    if len(formats) > 1 or (m.get("plan") or {}).get("rules"):
        t.add_row("formats", ", ".join(f"{k}: {v}" for k, v in formats.items()))
    if m.get("allocation"):
        t.add_row("allocation", f"{m['allocation']['name']}: {len(m['allocation'].get('groups', {}))} groups")
    t.add_row("time / peak RSS", f"{m['timing']['prune_s']:.1f} s / {m['timing']['peak_rss_mb']:.0f} MB")
    return [t] + [f"[yellow]warning:[/yellow] {w}" for w in m.get("warnings") or []]


def bench_tables(r: dict) -> list:
    layers = Table("layer shape", "format", "tokens", "kernel", "packed ms", "dense ms", "speedup", "bytes limit",
                   title=f"per layer shape on {r['device']} ({r['torch_threads']} threads)", caption_justify="left",
                   caption="bytes limit = dense / packed weight bytes: the most a memory-bound kernel (small token "
                           "counts, decode) can gain by reading fewer bytes; speedup = dense ms / packed ms")
    for row in r["layers"]:
        fmt = row["format"] + (f"+{row['quant']}" if row["quant"] else "")
        layers.add_row("x".join(map(str, row["shape"])), fmt, str(row["tokens"]), row["kernel"],
                       f"{row['sparse_ms']:.3f}", f"{row['dense_ms']:.3f}", f"{row['speedup']:.2f}x",
                       f"{row['bytes_limit']:.2f}x")
    whole = Table("phase", "tokens", "packed ms", "dense ms", "speedup", title="whole model")
    by = {(f["phase"], f["model"]): f for f in r["forward"]}
    for phase in ("prefill", "decode"):
        if (phase, "sparse") in by:
            s, d = by[(phase, "sparse")], by[(phase, "dense")]
            whole.add_row(phase, str(s["tokens"]), f"{s['ms']:.2f}", f"{d['ms']:.2f}",
                          f"{d['ms'] / s['ms']:.2f}x")
    note = [f"[yellow]note:[/yellow] {r['note']}"] if r.get("note") else []
    gen = generation_tables(r["generation"]) if r.get("generation") else []
    return [layers, whole, f"bytes limit of the whole artifact's packed weights: {r['bytes_limit']:.2f}x", *gen, *note]


def generation_tables(g: dict) -> list:
    """`sparsify bench`'s end-to-end rows (prefill / decode tokens/s, or items/s) and memory per model."""
    unit = g["unit"]
    t = Table("phase", "batch", "tokens", f"packed {unit}", f"dense {unit}", "speedup",
              title=f"end to end against {g['dense_model']}", caption_justify="left",
              caption=f"median of {g['reps']} interleaved runs; decode: {g['decode_tokens']} greedy steps with the "
                      f"KV cache after a {g['prompt_len']}-token prompt" if g["decode_tokens"] else
                      f"median of {g['reps']} interleaved runs")
    for row in g["rows"]:
        t.add_row(row["phase"], str(row["batch"]), str(row["tokens"] or "-"), f"{row['sparse_per_s']:.1f}",
                  f"{row['dense_per_s']:.1f}", f"{row['speedup']['sparse']:.2f}x")
    peak_mb = g["memory"]["process_peak_rss_bytes"] / 2**20
    mem = Table("model", "weights MB", "dispatch cache MB", "peak MB", title="memory", caption_justify="left",
                caption="peak: CUDA, the most allocated during the model's runs; CPU, how far its runs raised the "
                        f"process's resident memory (process peak {peak_mb:.0f} MB)")
    for name in ("sparse", "dense"):
        m = g["memory"][name]
        peak = m.get("peak_allocated_bytes", m.get("rss_growth_bytes", 0))
        mem.add_row("packed" if name == "sparse" else "dense", f"{m['weights_bytes'] / 2**20:.1f}",
                    f"{m['dispatch_cache_bytes'] / 2**20:.1f}", f"{peak / 2**20:.1f}")
    return [t, mem]


def models_table(rows: list[dict]) -> list:
    """`sparsify models`: each alias, whether it is installed, and where it runs from (or how to get it)."""
    t = Table("alias", "family", "installed", "description", "directory / install")
    for r in rows:
        if not r["installed"]:
            where = r["install"]
        elif r["path"]:
            where = r["path"]
        else:
            where = f"not converted yet (the first use converts it into {r['convert_to']})"
        t.add_row(r["name"], r["family"], "yes" if r["installed"] else "no", r["description"], where)
    return [t]


def _collapse(names: list) -> list[str]:
    """Per-layer graph names folded: past_key_values.0.key ... .29.key -> past_key_values.{0..29}.key."""
    import re

    out, seen = [], {}
    for name in map(str, names):
        m = re.fullmatch(r"(.*?)\.(\d+)\.(.*)", name)
        key = (m.group(1), m.group(3)) if m else name
        if key not in seen:
            seen[key] = []
            out.append(key)
        if m:
            seen[key].append(int(m.group(2)))
    return [k if isinstance(k, str) else f"{k[0]}.{{{min(seen[k])}..{max(seen[k])}}}.{k[1]}" for k in out]


def export_summary(r: dict) -> list:
    t = Table(show_header=False, title="sparsify export")
    for key, value in r.items():
        if isinstance(value, float):
            value = f"{value:.3g}"
        elif key.startswith("greedy_") and isinstance(value, list):
            value = " ".join(map(str, value))
        elif isinstance(value, (list, tuple)):
            value = "\n".join(_collapse(value))
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        t.add_row(key.replace("_", " "), str(value))
    return [t]


def plan_table(r: dict) -> list:
    """`sparsify plan`: one row per target layer (grouped by block, as `info` shows them), then the totals."""
    from rich import box

    from sparsify.eval.tables import ellipsize, group_labels, human_bytes, split_name

    split = {row["module"]: split_name(row["module"]) for row in r["layers"]}
    labels = group_labels([v[0] for v in split.values() if v[1] is not None])
    title = f"plan for {r['model']}" + ("" if r["allocation"] == "uniform" else f" (before {r['allocation']} allocation)")
    tot = r["totals"]
    caption = (f"{tot['compressed']} of {tot['layers']} layers compressed, {tot['ratio']:.3f}x their dense bytes; "
               f"blocks: {', '.join(f'{p}.N' for p in labels) or '-'}; (T) = stored transposed (Conv1D)")
    t = Table(box=box.SIMPLE_HEAD, padding=(0, 1), title=title, title_justify="left", caption=caption,
              caption_justify="left")
    for col in ("block", "tensor", "shape", "method", "scheme", "format"):
        t.add_column(col, no_wrap=True)
    for col in ("sparsity", "est. bytes"):
        t.add_column(col, justify="right", no_wrap=True)
    for row in r["layers"]:
        prefix, index, rest = split[row["module"]]
        skip = row["skip_reason"]
        fmt = "-" if skip else row["format"] + ("" if row["quant"] == "none" else f" {row['quant']}")
        t.add_row("-" if index is None else f"{labels[prefix]}{index}", ellipsize(rest, 20),
                  "x".join(map(str, row["shape"])) + (" (T)" if row["layout"] == "conv1d" else ""),
                  "-" if skip else row["method"], "skip" if skip else row["scheme"], fmt, f"{row['sparsity']:.0%}",
                  human_bytes(row["est_bytes"]))
    t.add_section()
    t.add_row("total", "", "", "", "", "", f"{tot['sparsity']:.1%}", human_bytes(tot["est_bytes"]))
    skipped = [f"skipped {ellipsize(row['module'], 48)}: {row['skip_reason']}" for row in r["layers"]
               if row["skip_reason"] and row["skip_reason"] != "plan: skip"]
    return [t, *skipped]
