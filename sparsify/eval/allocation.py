"""What an allocator decided, per group: for `sparsify info`, `eval`'s JSON and `eval --report`.

Allocators (OWL, ECoFLaP, LPViT) record in the manifest, per group (a block, a matrix or a tower),
the sparsity they gave it and, where they have one, the score that decided it. Users compare
allocations by these: which blocks the loss protected, how far the spread goes, whether a cap bit.
"""
from __future__ import annotations

from pathlib import Path

from rich import box
from rich.table import Table


def allocation_summary(manifest: dict | None) -> dict | None:
    """{"name", "target", "options", "groups": {group: {"sparsity", "score"?, "share"?, "matrices"?}}} or None."""
    a = (manifest or {}).get("allocation") or {}
    groups = a.get("groups") or {}
    if not groups:
        return None
    scores = {g: v["score"] for g, v in groups.items() if isinstance(v.get("score"), (int, float))}
    total = sum(abs(s) for s in scores.values()) or 1.0
    rows = {}
    for g, v in groups.items():
        row = {"sparsity": v["sparsity"]}
        if g in scores:
            row.update(score=scores[g], share=abs(scores[g]) / total)
        if "matrices" in v:
            row["matrices"] = v["matrices"]
        rows[g] = row
    extra = {k: a[k] for k in ("max_sparsity", "score_kind", "group", "loss", "score_s") if k in a}
    return {"name": a.get("name"), "target": a.get("target"), "options": a.get("options", {}), **extra,
            "groups": rows}


def allocation_table(summary: dict) -> Table:
    """One row per group: its sparsity, its score and the score's share of all groups'."""
    target = summary.get("target")
    title = f"{summary['name']} allocation" + (f", target {target:.1%}" if isinstance(target, float) else "")
    if "max_sparsity" in summary:
        title += f", cap {summary['max_sparsity']:.1%}"
    t = Table(box=box.SIMPLE_HEAD, padding=(0, 1), title=title, title_justify="left")
    scored = any("score" in r for r in summary["groups"].values())
    t.add_column("group", no_wrap=True, max_width=56, overflow="ellipsis")
    for col in ("sparsity", *(("score", "share") if scored else ())):
        t.add_column(col, justify="right", no_wrap=True)
    for g, r in summary["groups"].items():
        t.add_row(g, f"{r['sparsity']:.1%}",
                  *((f"{r['score']:.4g}", f"{r['share']:.1%}") if "score" in r else ("-", "-") if scored else ()))
    return t


def plot_allocation(summary: dict, path: Path, plt) -> Path:
    """Bars of each group's sparsity, its score share on a second axis; ``plt`` is matplotlib.pyplot."""
    names = list(summary["groups"])
    rows = summary["groups"].values()
    fig, ax = plt.subplots(figsize=(min(16, max(8, len(names) * 0.25)), 3.6))
    ax.bar(range(len(names)), [r["sparsity"] for r in rows], width=0.8, color="C0", label="sparsity")
    if isinstance(summary.get("target"), float):
        ax.axhline(summary["target"], color="k", ls="--", lw=1, label=f"target {summary['target']:.1%}")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("sparsity")
    if any("share" in r for r in rows):
        twin = ax.twinx()
        twin.plot(range(len(names)), [r.get("share", float("nan")) for r in rows], color="tab:red", marker=".",
                  lw=1, label="score share")
        twin.set_ylabel("score / sum of scores")
        twin.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize=7, frameon=False)
    step = max(1, len(names) // 40)
    ax.set_xticks(range(0, len(names), step), [n if len(n) <= 24 else "…" + n[-23:] for n in names[::step]], rotation=45, ha="right",
                  fontsize=7)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=7, frameon=False)
    ax.set_title(f"{summary['name']} allocation per group", fontsize=10, loc="left", pad=18)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
