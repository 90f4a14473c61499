"""`--report DIR`: the evaluation as eval.json plus a PNG of sparsity per layer."""
from __future__ import annotations

import json
from pathlib import Path

from sparsify.errors import UserError


def write_report(result: dict, out_dir: str | Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--report needs matplotlib: pip install matplotlib") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "eval.json"
    js.write_text(json.dumps(result, indent=1, default=str))
    layers = result["size"]["layers"]
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.08), 3.5))
    ax.bar(range(len(layers)), [v["sparsity"] for v in layers.values()], width=1.0)
    ax.set_xlabel("targeted layer (model order)")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_title(f"{result['model']}: overall {result['size']['sparsity']:.1%}")
    fig.tight_layout()
    png = out / "sparsity.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return [js, png]
