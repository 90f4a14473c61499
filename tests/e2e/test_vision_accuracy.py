"""`sparsify eval --task accuracy` on the trained digits ViT (tests/trained_models.py): the dense model's
held-out top-1 through the CLI, then pruned artifacts (uniform block magnitude, LPViT) beside it."""
from __future__ import annotations

import json

import pytest
from helpers import cli, cli_json
from trained_models import trained_vit, write_digit_folder  # noqa: F401  (trained_vit: session fixture)

CALIB = ["--samples", "16", "--batch-size", "8"]


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    return write_digit_folder(tmp_path_factory.mktemp("digits") / "test")


@pytest.fixture(scope="module")
def few_digits(tmp_path_factory):
    """The first 120 held-out digits: enough to tell the pruned runs apart, a third of the time."""
    return write_digit_folder(tmp_path_factory.mktemp("digits") / "few", n=120)


def test_trained_vit_accuracy_through_the_cli(trained_vit, digit_folder):
    r = cli_json("eval", trained_vit, "--task", "accuracy", "--data", digit_folder)
    a = r["accuracy"]
    expected = json.loads((trained_vit / "trained.json").read_text())["test_top1"]
    assert a["images"] == 360 and a["classes"] == "id2label"
    assert a["top1"] >= 0.9 and a["top1"] == pytest.approx(expected, abs=1e-6)  # PNG round trip is exact
    assert a["top5"] >= a["top1"]


@pytest.mark.parametrize("allocation", ["uniform", "lpvit"])
def test_pruned_accuracy_beside_dense(trained_vit, few_digits, tmp_path, allocation):
    out = tmp_path / allocation
    cli("prune", trained_vit, "--method", "magnitude", "--scheme", "block:16x16", "--sparsity", "0.3",
        "--allocation", allocation, "-o", out, *CALIB)
    r = cli_json("eval", out, "--task", "accuracy", "--data", few_digits)
    a = r["accuracy"]
    assert a["images"] == 120 and r["baseline"]["from"] == "manifest"  # the dense source, evaluated on the same images
    assert a["baseline"]["top1"] >= 0.9
    assert 0.1 < a["top1"] <= 1 and 0 < a["agreement_top1"] <= 1
    # uniform: int(tiles * 0.3) per layer (4 of 16, 9 of 32 tiles); lpvit meets the budget in whole tiles
    assert r["size"]["sparsity"] == pytest.approx(0.3, abs=0.01 if allocation == "lpvit" else 0.04)
    print(f"{allocation}: top-1 {a['top1']:.3f} (dense {a['baseline']['top1']:.3f}), "
          f"agreement {a['agreement_top1']:.3f}")
    if allocation == "uniform":
        return
    # built-in photos: no labels for digits, agreement with the dense top-1 only
    builtin = cli_json("eval", out, "--task", "accuracy")["accuracy"]
    assert builtin["images"] == 48 and "top1" not in builtin and 0 <= builtin["agreement_top1"] <= 1
    assert "same top-1 as dense" in cli("eval", out, "--task", "accuracy").stdout
