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


@pytest.mark.parametrize("bad", ["half", "blocky", "2:5x"])
def test_unknown_scheme_suggests_only_what_works(bad):
    with pytest.raises(UserError) as e:
        Scheme.parse(bad)
    from sparsify.formats import format_for

    suggested = [w for w in ("unstructured", "2:4", "4:8", "block:32x32") if w in str(e.value).replace(bad, "")]
    assert "2:4" in suggested and "block:32x32" in suggested
    for scheme in suggested:  # every scheme the message suggests parses and has a packed format
        format_for(Scheme.parse(scheme))


def test_options_that_would_do_nothing_are_refused():
    """N:M fixes the fraction; --group-size only shapes int4; float64 has no kernel or format."""
    with pytest.raises(UserError, match="--sparsity 0.7 does nothing with --scheme 2:4"):
        PruneConfig(scheme="2:4", sparsity=0.7)
    assert PruneConfig(scheme="1:4", sparsity=0.75).sparsity == 0.75  # the scheme's own fraction: consistent
    assert PruneConfig(scheme="2:4").sparsity == 0.5  # the default
    for quant in ("none", "int8", "fp8", "w8a8"):
        with pytest.raises(UserError, match="--group-size applies to --quant int4 only"):
            PruneConfig(quant=quant, group_size=64)
    assert PruneConfig(quant="int4", group_size=0).group_size == 0
    with pytest.raises(UserError, match="float32, float16, bfloat16"):
        PruneConfig(dtype="float64")


def test_presets_set_the_concrete_method_and_keep_the_users_options():
    from sparsify.presets import PRESETS

    best = PruneConfig(preset="best", scheme="2:4")
    assert best.method == PRESETS["best"]["method"] and best.to_json()["preset"] == "best"
    assert PruneConfig(preset="fast").method == "wanda"
    tuned = PruneConfig(preset="best", method_args={"damp": 0.05})
    assert tuned.method_args["damp"] == 0.05
    assert PruneConfig(**{**tuned.to_json(), "scheme": "unstructured", "calib": tuned.calib}).method == best.method
    with pytest.raises(UserError, match="--preset 'quick': use one of fast, best"):
        PruneConfig(preset="quick")


def test_preset_distillation_is_concrete_and_the_users_value_wins():
    from sparsify.presets import PRESETS, preset_hint

    want = PRESETS["best"]
    best = PruneConfig(preset="best", scheme="2:4")
    assert (best.distill_steps, best.distill_lr) == (want["distill_steps"], want["distill_lr"])
    assert best.to_json()["distill_steps"] == want["distill_steps"]  # the manifest records the number, not the name
    off = PruneConfig(preset="best", scheme="2:4", distill_steps=0)
    assert off.distill_steps == 0 and off.distill_lr == want["distill_lr"]
    assert PruneConfig(preset="best", scheme="2:4", distill_lr=1e-3).distill_lr == 1e-3
    for plain in (PruneConfig(), PruneConfig(preset="fast")):
        assert (plain.distill_steps, plain.distill_lr) == (0, 1e-4)
    assert "--distill-steps 0" in preset_hint("best") and preset_hint("fast") == preset_hint(None) == ""
