"""Sparse distillation on a tiny random Llama: the mask is provably unchanged, the student moves toward the
teacher (measured with a plain full-logit KL), quantized weights end exactly on their grid, both modes run,
0 steps is a no-op. The building blocks are checked against direct (unchunked / per-element) references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_tiny

from sparsify import distill, progress
from sparsify.config import CalibConfig, PruneConfig
from sparsify.distill.loss import chunked_kl, normalized_mse
from sparsify.distill.train import FakeQuant, finalize, masked_step
from sparsify.errors import UserError
from sparsify.models.load import load_model, resolve
from sparsify.calibrate.batches import calibration_batches
from sparsify.planning import build_plan
from sparsify.pruning import prune_model
from sparsify.quant import rtn
from sparsify.quant.spec import QuantParams, QuantSpec


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls gain nothing from a second thread, and lose a lot to its spin-waits on a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("distill")
    text = root / "calib.txt"
    text.write_text("\n\n".join(list(topics.values())[:40]))
    return resolve(str(make_tiny("llama", root / "llama"))), str(text)


def _prune(loaded, cfg, quantize=True) -> tuple[dict, dict]:
    """Prune ``loaded`` in place as the pipeline does; (pruned modules by name, quant params by name)."""
    planned = build_plan(loaded.model, cfg)
    result = prune_model(loaded.model, planned, lambda: calibration_batches(loaded, cfg.calib), quantize=quantize)
    return {n: m for mods in planned.active.values() for n, m in mods.items()}, result.qparams


def _pruned(tiny, quant="none", steps=5, group_size=None, quantize=True):
    src, text = tiny
    progress.set_enabled(False)
    cfg = PruneConfig(method="magnitude", scheme="2:4", quant=quant, group_size=group_size, distill_steps=steps,
                      calib=CalibConfig(source=text, samples=8, seq_len=32, batch_size=4))
    loaded = load_model(src)
    return (src, cfg, loaded, *_prune(loaded, cfg, quantize))


def _teacher_kl(loaded, src, cfg) -> float:
    """Reference: plain full-logit KL(teacher || student), summed over every calibration token."""
    teacher = load_model(src).model
    total = 0.0
    with torch.no_grad():
        for batch in calibration_batches(loaded, cfg.calib):
            t, s = teacher(**batch).logits, loaded.model(**batch).logits  # (b, T, vocab)
            total += float((t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum())
    return total


def _check_mask(flat, before):
    changed = 0
    for name, lin in flat.items():
        w = lin.weight.detach()
        assert torch.equal(w != 0, before[name] != 0), name  # same positions, hence the same count
        changed += int((w != before[name]).sum())
    return changed


@pytest.mark.parametrize("mode", ["end-to-end", "block-wise"])
def test_mask_frozen_and_student_moves_toward_teacher(tiny, mode):
    src, cfg, loaded, flat, qparams = _pruned(tiny)
    before = {n: lin.weight.detach().clone() for n, lin in flat.items()}
    kl_before = _teacher_kl(loaded, src, cfg)
    info = distill.distill_model(loaded, flat, qparams, cfg, src, lr=2e-3, mode=mode)
    assert info["mode"] == mode and info["steps"] == 5 and info["loss_last"] < info["loss_first"]
    assert _check_mask(flat, before) > 0
    assert _teacher_kl(loaded, src, cfg) < 0.9 * kl_before
    assert all(p.requires_grad for p in loaded.model.parameters())  # as loaded: flags restored
    assert not any(torch.nn.utils.parametrize.is_parametrized(lin) for lin in flat.values())


@pytest.mark.parametrize("quant,group_size,mode", [("int4", 32, "end-to-end"), ("int8", None, "block-wise")])
def test_quantized_weights_end_on_their_grid(tiny, quant, group_size, mode):
    src, cfg, loaded, flat, qparams = _pruned(tiny, quant, steps=3, group_size=group_size)
    before = {n: lin.weight.detach().clone() for n, lin in flat.items()}
    distill.distill_model(loaded, flat, qparams, cfg, src, lr=5e-3, mode=mode)
    assert _check_mask(flat, before) > 0
    for name, lin in flat.items():
        assert torch.equal(rtn.snap(lin.weight.detach(), qparams[name]), lin.weight.detach()), name


@pytest.mark.parametrize("quant,group_size", [("int8", None), ("int4", 32)])
def test_quantize_after_is_round_to_nearest_of_the_float_distillation(tiny, quant, group_size):
    """``specs`` (--distill-quant after): pruned and trained in float, then rounded with scales fitted to the
    trained weights. Reference: the same float distillation without specs, then `rtn.fake_quantize`, with
    kept weights that round to 0.0 set one grid step from zero with their entry sign."""
    src, cfg, ref, flat_ref, none = _pruned(tiny, quant, steps=3, group_size=group_size, quantize=False)
    assert none == {}  # pruned in float: nothing quantized yet
    entry = {n: lin.weight.detach().clone() for n, lin in flat_ref.items()}
    distill.distill_model(ref, flat_ref, {}, cfg, src, lr=5e-3, mode="end-to-end")
    _, _, loaded, flat, qparams = _pruned(tiny, quant, steps=3, group_size=group_size, quantize=False)
    spec = QuantSpec.parse(quant, group_size)
    info = distill.distill_model(loaded, flat, qparams, cfg, src, lr=5e-3, mode="end-to-end",
                                 specs={n: spec for n in flat})
    assert info["quant"] == "after" and set(qparams) == set(flat)
    for name, lin in flat.items():
        want, params = rtn.fake_quantize(flat_ref[name].weight.detach(), spec)  # (out, in)
        got, keep = lin.weight.detach(), entry[name] != 0
        assert torch.equal(params.scale, qparams[name].scale), name
        assert torch.equal(got != 0, keep), name
        assert torch.equal(got[want != 0], want[want != 0]), name
        nudged = keep & (want == 0)
        step = rtn.expand_params(params, *nudged.nonzero(as_tuple=True), got.shape[1])[0]  # (k,)
        assert torch.equal(got[nudged].abs(), step), name  # one grid step (int8 and symmetric int4: the scale)
        assert torch.equal(torch.sign(got[nudged]), torch.sign(entry[name][nudged])), name
    assert sum(int((e != 0).sum()) for e in entry.values()) == sum(int((lin.weight != 0).sum()) for lin in flat.values())


def test_quantize_after_block_wise_ends_on_grid_and_counts_nudges(tiny):
    src, cfg, loaded, flat, qparams = _pruned(tiny, "int8", steps=3, quantize=False)
    before = {n: lin.weight.detach().clone() for n, lin in flat.items()}
    with torch.no_grad():  # row 0 of the first layer: one kept weight 1.0, the others 1e-9 (they round to 0.0)
        row = next(iter(flat.values())).weight[0]
        kept = row.nonzero().flatten()
        row[kept] = row[kept].sign() * 1e-9
        row[kept[0]] = 1.0  # 3 steps at lr 1e-6 move none of them past half a step (1 / 254)
    spec = QuantSpec("int8")
    info = distill.distill_model(loaded, flat, qparams, cfg, src, lr=1e-6, mode="block-wise",
                                 specs={n: spec for n in flat})
    assert info["quant"] == "after" and info["nudged"] >= len(kept) - 1
    assert _check_mask(flat, before) > 0
    for name, lin in flat.items():
        assert torch.equal(rtn.snap(lin.weight.detach(), qparams[name]), lin.weight.detach()), name


def test_zero_steps_is_a_no_op(tiny):
    src, cfg, loaded, flat, qparams = _pruned(tiny, steps=0)
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    assert distill.distill_model(loaded, flat, qparams, cfg, src)["steps"] == 0
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())


def test_auto_mode_follows_memory_and_bad_mode_is_a_user_error(tiny, monkeypatch):
    src, cfg, loaded, flat, qparams = _pruned(tiny, steps=1)
    with pytest.raises(UserError, match="distill mode"):
        distill.distill_model(loaded, flat, qparams, cfg, src, mode="fast")
    monkeypatch.setattr(distill, "available_bytes", lambda device: 1024)
    assert distill.distill_model(loaded, flat, qparams, cfg, src)["mode"] == "block-wise"
    monkeypatch.setattr(distill, "available_bytes", lambda device: 1 << 40)
    assert distill.distill_model(loaded, flat, qparams, cfg, src)["mode"] == "end-to-end"


def test_chunked_kl_matches_full_logits_and_gradients():
    g = torch.Generator().manual_seed(1)
    s_h = torch.randn(2, 7, 16, generator=g).requires_grad_(True)  # (b, T, hidden)
    t_h = torch.randn(2, 7, 16, generator=g)
    s_head, t_head = torch.nn.Linear(16, 50, bias=False), torch.nn.Linear(16, 50, bias=False)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # padding
    got = chunked_kl(s_h, t_h, s_head, t_head, mask, chunk=3)
    (g_got,) = torch.autograd.grad(got, s_h)
    rows = []
    for b in range(2):
        for t in range(7):
            if mask[b, t]:
                p = F.softmax(t_head(t_h[b, t]), -1)
                rows.append((p * (p.log() - F.log_softmax(s_head(s_h[b, t]), -1))).sum())
    want = torch.stack(rows).mean()
    (g_want,) = torch.autograd.grad(want, s_h)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(g_got, g_want, atol=1e-6)


def test_normalized_mse_formula():
    s, t = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    assert torch.allclose(normalized_mse(s, t), ((s - t) ** 2).sum() / (t ** 2).sum())


@pytest.mark.parametrize("spec,cols", [(QuantSpec("int4", 32), 64), (QuantSpec("int4", 32, symmetric=False), 64),
                                       (QuantSpec("int8"), 40), (QuantSpec("fp8"), 40), (QuantSpec("int4", 32), 48)])
def test_fake_quant_is_snap_with_identity_gradient(spec, cols):
    w = torch.randn(6, cols, generator=torch.Generator().manual_seed(2))
    params = rtn.compute_params(w, spec)
    fq = FakeQuant(params, cols)
    x = (w * 1.3).requires_grad_(True)  # off-grid values, some beyond the group range
    y = fq(x)
    assert torch.equal(y.detach(), rtn.snap(x.detach(), params))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("quant", [None, "int4", "int4-asym", "int8"])
def test_finalize_nudges_kept_zeros_and_clears_pruned(quant):
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(32, 4, bias=False)
    keep = torch.rand(4, 32, generator=g) > 0.5
    sign = torch.where(torch.rand(4, 32, generator=g) > 0.5, 1, -1).to(torch.int8)
    spec = {None: None, "int4": QuantSpec("int4", 32), "int4-asym": QuantSpec("int4", 32, False),
            "int8": QuantSpec("int8")}[quant]
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 32, generator=g))
        lin.weight[:, :8] = 0.0  # kept weights trained to exactly zero
        lin.weight[:, 8:12] = 1e-4  # kept weights that round to zero
        if quant == "int4-asym":
            lin.weight[0] = lin.weight[0].abs()  # row 0: zero point 0, no negative grid value
    params = None if spec is None else rtn.compute_params(lin.weight.detach(), spec)
    finalize({"w": lin}, {"w": keep}, {"w": sign}, {"w": params})
    w = lin.weight.detach()
    assert torch.equal(w != 0, keep)
    if params is not None:
        assert torch.equal(rtn.snap(w, params), w)
    flipped = (w[:, :8] != 0) & (torch.sign(w[:, :8]) != sign[:, :8])
    if quant == "int4-asym":
        flipped[0] = False  # allowed only where the grid has no value of that sign
    assert not flipped.any()


def test_masked_step_never_revives_a_pruned_weight():
    g = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(8, 8, generator=g))
    keep = torch.rand(8, 8, generator=g) > 0.5
    with torch.no_grad():
        p.mul_(keep)
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.0)
    for _ in range(3):
        (p * torch.randn(8, 8, generator=g)).sum().backward()
        masked_step(opt, [p], [keep])
    assert torch.equal(p.detach()[~keep], torch.zeros(int((~keep).sum())))
    assert torch.equal(opt.state[p]["exp_avg"][~keep], torch.zeros(int((~keep).sum())))


@pytest.mark.parametrize("family,mode", [("bert", "block-wise"), ("vit", "end-to-end")])
def test_other_families_run_with_a_frozen_mask(tmp_path, family, mode):
    progress.set_enabled(False)
    src = resolve(str(make_tiny(family, tmp_path / family)))
    cfg = PruneConfig(method="magnitude", scheme="2:4", distill_steps=5,  # every step sees the same 4 samples
                      calib=CalibConfig(source="builtin", samples=4, seq_len=16, batch_size=4))
    loaded = load_model(src)
    flat, qparams = _prune(loaded, cfg)
    before = {n: lin.weight.detach().clone() for n, lin in flat.items()}
    info = distill.distill_model(loaded, flat, qparams, cfg, src, lr=5e-4, mode=mode)
    assert info["mode"] == mode and info["loss_last"] < info["loss_first"]
    assert _check_mask(flat, before) > 0
