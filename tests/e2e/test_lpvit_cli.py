"""``--allocation lpvit`` end to end on the tiny ViT (hidden 64, MLP 128: 16 or 32 tiles of 16x16 per
layer): the artifact is bsr, per-layer sparsities differ, and the budget holds, counted in its weights."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import cli, cli_json, dense_weights
from tiny_models import make_tiny

CALIB = ["--samples", "8", "--batch-size", "4"]


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return make_tiny("vit", tmp_path_factory.mktemp("tiny") / "vit")


def _zero_tiles(w: torch.Tensor, r: int = 16, c: int = 16) -> float:
    """Fraction of whole R x C tiles of w (out, in) that are all zero (the shapes here divide evenly)."""
    tiles = (w == 0).reshape(w.shape[0] // r, r, w.shape[1] // c, c).all(3).all(1)  # (out/R, in/C)
    return tiles.float().mean().item()


@pytest.mark.parametrize("budget", [[], ["--allocation-arg", "flops_kept=0.6"]], ids=["sparsity", "flops"])
def test_lpvit_prunes_blocks_to_the_budget(vit, tmp_path, budget):
    out = tmp_path / "out"
    m = cli_json("prune", vit, "--method", "magnitude", "--scheme", "block:16x16", "--sparsity", "0.5",
                 "--allocation", "lpvit", *budget, "-o", out, *CALIB)
    assert {e["format"] for e in m["tensors"].values()} == {"bsr"}
    a = m["allocation"]
    assert a["name"] == "lpvit" and a["budget"] == ("flops" if budget else "params")
    weights = dense_weights(out)
    assert len(weights) == 12
    tiles = {n: _zero_tiles(w) for n, w in weights.items()}
    assert len({round(v, 4) for v in tiles.values()}) >= 3  # not uniform
    for n, w in weights.items():  # every zero is in a whole zero tile, as the plan says
        assert (w == 0).float().mean().item() == pytest.approx(tiles[n], abs=1e-6)
        assert tiles[n] == pytest.approx(a["groups"][n]["sparsity"], abs=1e-9)
        assert tiles[n] < 1  # at least one tile kept
    numel = sum(w.numel() for w in weights.values())
    kept = sum(int((w != 0).sum()) for w in weights.values()) / numel  # every layer sees 17 tokens: FLOPs = weights
    assert kept == pytest.approx(0.6 if budget else 0.5, abs=0.01)
    assert "lpvit" in cli("info", out).stdout


def test_lpvit_needs_a_block_scheme(vit, tmp_path):
    r = cli("prune", vit, "--method", "magnitude", "--sparsity", "0.5", "--allocation", "lpvit", "-o", tmp_path / "o",
            *CALIB, code=2)
    assert "--scheme block:16x16" in r.stderr


def test_measured_cost_from_bench(vit, tmp_path):
    """`sparsify bench --save-costs` times the artifact's block layer shapes; LPViT's cost=measured reads them."""
    first = tmp_path / "uniform"
    cli_json("prune", vit, "--method", "magnitude", "--scheme", "block:16x16", "--sparsity", "0.5", "-o", first)
    lat = tmp_path / "lat.json"
    b = cli_json("bench", first, "--tokens", "4", "--reps", "1", "--no-generation", "--save-costs", lat)
    assert b["costs_file"] == str(lat)
    table = json.loads(lat.read_text())
    assert sorted(tuple(e["shape"]) for e in table["layers"]) == [(64, 64), (64, 128), (128, 64)]
    out = tmp_path / "measured"
    m = cli_json("prune", vit, "--method", "magnitude", "--scheme", "block:16x16", "--sparsity", "0.5",
                 "--allocation", "lpvit", "--allocation-arg", "cost=measured", "--allocation-arg", f"costs={lat}",
                 "-o", out, *CALIB)
    a = m["allocation"]
    assert a["options"]["cost"] == "measured" and abs(a["achieved"] - a["target"]) <= 0.01
    r = cli("prune", vit, "--method", "magnitude", "--scheme", "block:16x16", "--sparsity", "0.5", "--allocation",
            "lpvit", "--allocation-arg", "cost=measured", "-o", tmp_path / "o", *CALIB, code=2)
    assert "costs=FILE" in r.stderr and not (tmp_path / "o").exists()
    dense = tmp_path / "nm"
    cli_json("prune", vit, "--method", "magnitude", "--scheme", "2:4", "-o", dense)
    r = cli("bench", dense, "--tokens", "4", "--reps", "1", "--no-generation", "--save-costs", lat, code=2)
    assert "has none" in r.stderr
