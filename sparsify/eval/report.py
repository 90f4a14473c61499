"""`--report DIR`: the evaluation as eval.json plus a PNG of sparsity per layer.

The plot has one bar per targeted layer in model order (measured sparsity, coloured by packed
format), a dashed line at the overall sparsity and, for artifacts, a line of packed / dense bytes per
layer, with ticks at the first layer of each transformer block. matplotlib is imported only here, only when a report is asked for.
"""
from __future__ import annotations

import json
from pathlib import Path

from sparsify.errors import UserError
from sparsify.eval.tables import group_labels, split_name

MAX_TICKS = 16


def check_report(out_dir: str | Path) -> None:
    """UserError naming the fix when matplotlib is missing or ``out_dir`` is a file; `sparsify eval --report`
    calls it before evaluating, so that minutes of work never end in an error that was known at the start."""
    _pyplot()
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(f"--report {out_dir} is a file: pass a directory for eval.json and sparsity.png")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("--report needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _block_ticks(names: list[str]) -> tuple[list[int], list[str]]:
    """Positions and labels of the first layer of each block, thinned to at most MAX_TICKS."""
    split = [split_name(name) for name in names]
    short = group_labels([group for group, index, _ in split if index is not None])
    starts, labels, last = [], [], None
    for i, (group, index, rest) in enumerate(split):
        if (group, index) != last:
            starts.append(i)
            labels.append(f"{short[group]}{index}" if index is not None else rest.rsplit(".", 1)[-1])
            last = (group, index)
    step = max(1, -(-len(starts) // MAX_TICKS))  # ceil
    return starts[::step], labels[::step]


def plot_sparsity(result: dict, path: Path) -> Path:
    """Write the sparsity-per-layer PNG of ``result`` (as returned by `evaluate`) to ``path``."""
    plt = _pyplot()
    size = result["size"]
    names = list(size["layers"])
    fig, ax = plt.subplots(figsize=(min(16, max(8, len(names) * 0.06)), 3.6))
    if names:
        per_tensor = (result.get("bytes") or {}).get("layers", {})  # keyed by tensor ("{module}.weight")
        formats = [(per_tensor.get(n) or per_tensor.get(f"{n}.weight") or {}).get("format", "") for n in names]
        colors = {f: f"C{i}" for i, f in enumerate(dict.fromkeys(formats))}
        for fmt, color in colors.items():  # one bar series per packed format, so the legend names them
            idx = [i for i, f in enumerate(formats) if f == fmt]
            ax.bar(idx, [size["layers"][names[i]]["sparsity"] for i in idx], width=0.9, color=color,
                   label=f"sparsity ({fmt})" if fmt else "sparsity")
        ax.axhline(size["sparsity"], color="k", ls="--", lw=1, label=f"overall {size['sparsity']:.1%}")
        packed = (result.get("bytes") or {}).get("layers", {})
        if len(packed) == len(names):
            ax.plot(range(len(names)), [v["ratio"] for v in packed.values()], color="tab:red", marker=".",
                    lw=1, label="packed / dense bytes")
        ticks, labels = _block_ticks(names)
        ax.set_xticks(ticks, labels, rotation=45, ha="right", fontsize=7)
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, fontsize=7, frameon=False)
    else:
        ax.text(0.5, 0.5, "no targeted layers found", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("targeted layer (model order; ticks at block starts)")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{Path(str(result.get('model', 'model'))).name}: sparsity per layer", fontsize=10, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: dict, out_dir: str | Path) -> list[Path]:
    """Write ``eval.json``, ``sparsity.png`` and, after an allocator, ``allocation.png`` into ``out_dir``
    (created if missing); returns the paths."""
    _pyplot()  # fail on a missing matplotlib before writing anything
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--report {out} is a file: pass a directory for eval.json and sparsity.png")
    out.mkdir(parents=True, exist_ok=True)
    js = out / "eval.json"
    js.write_text(json.dumps(result, indent=1, default=str) + "\n")
    written = [js, plot_sparsity(result, out / "sparsity.png")]
    if result.get("allocation"):  # an allocator's per-group sparsity and scores
        from sparsify.eval.allocation import plot_allocation

        written.append(plot_allocation(result["allocation"], out / "allocation.png", _pyplot()))
    return written
