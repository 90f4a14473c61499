import pytest

from sparsify.config import PruneConfig, Scheme
from sparsify.errors import UserError


@pytest.mark.parametrize("text,kind,n,m", [("2:4", "nm", 2, 4), ("4:8", "nm", 4, 8), (" 1:3 ", "nm", 1, 3),
                                           ("unstructured", "unstructured", 0, 0), ("Dense", "dense", 0, 0)])
def test_parse_ok(text, kind, n, m):
    s = Scheme.parse(text)
    assert (s.kind, s.n, s.m) == (kind, n, m)
    assert Scheme.parse(str(s)) == s


def test_parse_block():
    s = Scheme.parse("block:32x16")
    assert s.kind == "block" and s.block == (32, 16) and str(s) == "block:32x16"


@pytest.mark.parametrize("bad", ["2:5x", "4:2", "0:4", "2:2", "block:0x4", "half", "", "2:4:8"])
def test_parse_errors_name_the_fix(bad):
    with pytest.raises(UserError, match="scheme"):
        Scheme.parse(bad)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_range(sparsity):
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        PruneConfig(sparsity=sparsity)


def test_target_sparsity_and_json():
    assert Scheme.parse("2:4").target_sparsity(0.9) == 0.5
    assert Scheme.parse("unstructured").target_sparsity(0.3) == 0.3
    cfg = PruneConfig(method="wanda", scheme="4:8")
    assert cfg.to_json()["scheme"] == "4:8" and cfg.to_json()["calib"]["seed"] == 0
