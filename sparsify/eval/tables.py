"""Readable rich tables for `sparsify eval` and `sparsify info`."""
from __future__ import annotations

from rich.table import Table


def short(name: str, width: int = 44) -> str:
    """Shorten a module name from the left, keeping the informative tail."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def eval_table(r: dict) -> Table:
    t = Table(title=f"sparsify eval {r['model']}", show_header=False)
    t.add_row("family / task", f"{r['family']} / {r['task']}")
    if "perplexity" in r:
        p = r["perplexity"]
        t.add_row("perplexity", f"{p['perplexity']:.3f}  ({p['windows']} windows x {p['seq_len']} tokens of "
                                f"{p['data']} {p['split']} text, {p['tokens']} predicted tokens)")
    if "agreement" in r:
        a = r["agreement"]
        t.add_row("agreement vs " + a["baseline"], ", ".join(f"{k}={v:.4f}" for k, v in a.items()
                                                              if isinstance(v, float)))
    s = r["size"]
    t.add_row("sparsity (targeted layers)", f"{s['sparsity']:.2%} over {len(s['layers'])} layers")
    if "packed_bytes" in s:
        t.add_row("packed / dense bytes", f"{s['packed_bytes'] / 1e6:.2f} MB / {s['dense_bytes'] / 1e6:.2f} MB "
                                          f"= {s['ratio']:.3f}x")
        t.add_row("artifact on disk", f"{s['disk_bytes'] / 1e6:.1f} MB")
    return t


def info_table(m: dict) -> list:
    cfg, tot = m["config"], m["totals"]
    head = Table(title="sparsify artifact", show_header=False)
    head.add_row("source", f"{m['source'].get('alias') or m['source']['path']} ({m['source'].get('family', 'bare')})")
    head.add_row("method / scheme", f"{cfg['method']} / {cfg['scheme']}"
                 + (f" {cfg['sparsity']:.0%} per {cfg['per']}" if cfg["scheme"] == "unstructured" else ""))
    head.add_row("quantization", str(cfg.get("quant", "none")))
    head.add_row("hyper-parameters", ", ".join(f"{k}={v}" for k, v in cfg.get("method_args", {}).items()) or "-")
    c = m.get("calibration")
    head.add_row("calibration", f"{c['source']}: {c['samples']} x {c['seq_len']} (seed {c['seed']})" if c else "none")
    layers = Table("tensor", "format", "shape", "sparsity", "packed", "dense", "ratio")
    for name, e in m["tensors"].items():
        fmt = e["format"] + (f"+{e['attrs']['quant']}" if e["attrs"].get("quant") else "")
        layers.add_row(short(name), fmt, "x".join(map(str, e["shape"])), f"{e['sparsity']:.1%}",
                       f"{e['bytes']:,}", f"{e['dense_bytes']:,}", f"{e['bytes'] / max(1, e['dense_bytes']):.3f}")
    layers.add_row("total", "", f"{tot['targets']} tensors", f"{tot['sparsity']:.1%}", f"{tot['packed_bytes']:,}",
                   f"{tot['dense_bytes']:,}", f"{tot['ratio']:.3f}")
    return [head, layers]
