"""Dispatch: which path runs for which device / format / quant / token count (CUDA mocked), the
Triton paths end to end against the reference on packed weights from `sparsify.formats` (which also
cross-checks the formats' layout against `nm_pack_ref`), the cached dense / semi-structured
fallbacks, and the custom ops' fake impls (opcheck).
"""
import gc
import types

import pytest
import torch

from sparsify import kernels
from sparsify.errors import UserError
from sparsify.kernels import ops
from sparsify.kernels import reference as R

NM = {"n": 2, "m": 4, "bits": 2, "shape": [8, 16], "dtype": "float16"}
KINDS = {"float": {}, "int8": {"quant": "int8"}, "int4": {"quant": "int4"}, "fp8": {"quant": "fp8"},
         "w8a8": {"quant": "int8", "activations": "int8"}}


def fake_x(tokens, device="cuda", dtype=torch.float16, inp=16):
    """Stands in for a CUDA tensor: dispatch reads only device, shape, numel and dtype."""
    return types.SimpleNamespace(device=torch.device(device), shape=(tokens, inp), dtype=dtype,
                                 numel=lambda: tokens * inp)


@pytest.mark.parametrize("kind", list(KINDS))
def test_cpu_and_forced_modes(monkeypatch, kind):
    attrs, x = {**NM, **KINDS[kind]}, torch.randn(3, 16)
    monkeypatch.delenv("SPARSIFY_KERNELS", raising=False)
    from sparsify.kernels.cpu import paths

    assert kernels.kernel_name(x, "nm", attrs) == paths.choose(x, "nm", attrs) != "reference"  # auto on CPU
    monkeypatch.setenv("SPARSIFY_KERNELS", "triton")
    assert kernels.kernel_name(x, "nm", attrs) == kernels.TRITON_PATH[kind]
    assert kernels.kernel_name(x, "bitmask", {"shape": [8, 16]}) == "reference"  # no Triton kernel: reference
    assert kernels.kernel_name(x, "nm", {**attrs, "m": 6}) == "reference"
    monkeypatch.setenv("SPARSIFY_KERNELS", "reference")
    assert kernels.kernel_name(fake_x(1), "nm", attrs) == "reference"  # forced even on CUDA


def test_bad_mode_and_triton_without_interpreter(monkeypatch):
    monkeypatch.setenv("SPARSIFY_KERNELS", "fast")
    with pytest.raises(UserError, match="reference, triton or auto"):
        kernels.kernel_name(torch.randn(1, 16), "nm", NM)
    monkeypatch.setenv("SPARSIFY_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(UserError, match="TRITON_INTERPRET"):
        kernels.kernel_name(torch.randn(1, 16), "nm", NM)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("semi", [True, False], ids=["semi", "no-semi"])
def test_cuda_table(monkeypatch, kind, semi):
    monkeypatch.setenv("SPARSIFY_KERNELS", "auto")
    monkeypatch.setattr(kernels, "semi_structured_available", lambda device: semi)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an fp8 GPU
    attrs, limit = {**NM, **KINDS[kind]}, kernels.TRITON_MAX_TOKENS[kind]
    assert kernels.kernel_name(fake_x(1), "nm", attrs) == kernels.TRITON_PATH[kind]
    assert kernels.kernel_name(fake_x(limit), "nm", attrs) == kernels.TRITON_PATH[kind]
    large = "semi-structured" if semi and kind == "float" else "dense-cached"
    assert kernels.kernel_name(fake_x(limit + 1), "nm", attrs) == large
    assert kernels.kernel_name(fake_x(limit + 1, dtype=torch.float32), "nm", attrs) == "dense-cached"
    assert kernels.kernel_name(fake_x(limit + 1), "nm", {**attrs, "n": 4, "m": 8}) == "dense-cached"
    assert kernels.kernel_name(fake_x(1), "bitmask", {"shape": [8, 16]}) == "dense-cached"


@pytest.mark.parametrize("capability,want", [((8, 0), "dense-cached"), ((8, 6), "dense-cached"),
                                              ((8, 9), "triton-nm-wq"), ((9, 0), "triton-nm-wq")])
def test_fp8_kernel_only_where_the_gpu_has_fp8(monkeypatch, capability, want):
    monkeypatch.setenv("SPARSIFY_KERNELS", "auto")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert kernels.kernel_name(fake_x(1), "nm", {**NM, "quant": "fp8"}) == want
    assert kernels.kernel_name(fake_x(1), "nm", {**NM, "quant": "int8"}) == "triton-nm-wq"  # others unchanged
    assert not kernels.THRESHOLDS_MEASURED  # until a GPU run of bench/kernel_speed.py sets them


def test_semi_structured_keeps_no_dense_copy(monkeypatch):
    """The semi-structured weight is built from a transient dense copy: the cache holds it alone."""
    formats = pytest.importorskip("sparsify.formats")
    w = R.random_nm_weight(8, 16, 2, 4, seed=4)
    tensors, attrs = formats.pack("nm", w, n=2, m=4)
    built = []

    class Semi:  # stands in for torch's SparseSemiStructuredTensor (CUDA only)
        def __init__(self, dense):
            built.append(dense)
            self.packed, self.meta = dense[:, ::2].clone(), torch.zeros(8, 1, dtype=torch.int16)

    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", Semi)
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, weight, bias=None: x @ w.T)
    kernels._CACHE.clear()
    kernels.IMPLS["semi-structured"](torch.randn(3, 16), "nm", tensors, attrs, None)
    assert len(built) == 1 and torch.equal(built[0], w)
    assert [tag for (_, _, tag) in kernels._CACHE] == [("semi", torch.float32)]  # no ("dense", ...) entry
    assert kernels.cache_bytes() == {"semi": 8 * 8 * 4 + 8 * 2}
    kernels._CACHE.clear()


def test_dense_cache_states_its_bytes():
    formats = pytest.importorskip("sparsify.formats")
    w = R.random_nm_weight(8, 16, 2, 4, seed=5)
    tensors, attrs = formats.pack("bitmask", w)
    kernels._CACHE.clear()
    kernels.IMPLS["dense-cached"](torch.randn(2, 16, dtype=torch.float16), "bitmask", tensors, attrs, None)
    assert kernels.cache_bytes() == {"dense": 8 * 16 * 2}  # (out, in) fp16: what a bitmask weight costs on GPU
    kernels._CACHE.clear()


def test_torch_compile_of_a_packed_model_matches_eager(tmp_path):
    """fullgraph=True: the dispatch adds no graph break (aot_eager: the graph without inductor's C++ build)."""
    import sparsify
    from tiny_models import make_tiny

    src = make_tiny("llama", tmp_path / "src")
    sparsify.prune(str(src), sparsify.PruneConfig(method="magnitude", scheme="2:4", quant="int8"), tmp_path / "a")
    model = sparsify.load(tmp_path / "a")[0].model
    ids = torch.randint(4, 500, (1, 9), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids).logits
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


SPECS = [None, ("int8", None, True), ("int4", 32, False), ("int4", None, True), ("fp8", None, True), "w8a8"]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_linear_triton_vs_reference_on_formats_weights(monkeypatch, spec, n, m):
    formats = pytest.importorskip("sparsify.formats")
    from sparsify.quant import rtn
    from sparsify.quant.spec import QuantSpec

    w = R.random_nm_weight(24, 64, n, m, seed=n + len(str(spec)), full=False)
    params = None
    if spec is not None:
        qspec = QuantSpec.parse("w8a8") if spec == "w8a8" else QuantSpec(*spec)
        w, params = rtn.fake_quantize(w, qspec)
    tensors, attrs = formats.pack("nm", w, n=n, m=m, quant=params)
    if spec is None:  # the formats engineer's layout and ours agree bit for bit
        values, meta = R.nm_pack_ref(w, n, m)
        assert torch.equal(tensors["values"], values) and torch.equal(tensors["meta"], meta)
    x, bias = torch.randn(2, 3, 64), torch.randn(24)
    monkeypatch.setenv("SPARSIFY_KERNELS", "reference")
    want = kernels.linear(x, "nm", tensors, attrs, bias)
    monkeypatch.setenv("SPARSIFY_KERNELS", "triton")
    torch.testing.assert_close(kernels.linear(x, "nm", tensors, attrs, bias), want, rtol=1e-4, atol=1e-4)
    if spec == "w8a8":  # a calibrated static activation scale is honoured by both paths
        tensors["input_scale"] = torch.tensor(0.05)
        got = kernels.linear(x, "nm", tensors, attrs, bias)
        monkeypatch.setenv("SPARSIFY_KERNELS", "reference")
        torch.testing.assert_close(got, kernels.linear(x, "nm", tensors, attrs, bias), rtol=1e-4, atol=1e-4)


def test_dense_cache_builds_once_and_drops_with_the_weight(monkeypatch):
    formats = pytest.importorskip("sparsify.formats")
    w = R.random_nm_weight(8, 16, 2, 4, seed=1)
    tensors, attrs = formats.pack("nm", w, n=2, m=4)
    calls = []
    unpack = formats.unpack
    monkeypatch.setattr(formats, "unpack", lambda *a: calls.append(1) or unpack(*a))
    x = torch.randn(5, 16)
    for _ in range(3):
        torch.testing.assert_close(kernels.IMPLS["dense-cached"](x, "nm", tensors, attrs, None), x @ w.T)
    assert len(calls) == 1
    before = len(kernels._CACHE)
    del tensors
    gc.collect()
    assert len(kernels._CACHE) == before - 1


def test_semi_structured_falls_back_to_dense_when_refused():
    formats = pytest.importorskip("sparsify.formats")
    w = R.random_nm_weight(8, 16, 2, 4, seed=2)
    tensors, attrs = formats.pack("nm", w, n=2, m=4)
    x = torch.randn(2, 3, 16)  # CPU: torch refuses the conversion, the cached dense weight runs instead
    torch.testing.assert_close(kernels.IMPLS["semi-structured"](x, "nm", tensors, attrs, None), x @ w.T)


def test_custom_ops_fake_impls():
    w = R.random_nm_weight(24, 64, 2, 4, seed=3)
    values, meta = R.nm_pack_ref(w, 2, 4)
    codes, qmeta, scale, zero = R.quant_pack_ref(w, 2, 4, "int4", 32, False)
    c8, m8, s8, _ = R.quant_pack_ref(w, 2, 4, "int8")
    x, bias = torch.randn(3, 64), torch.randn(24)
    torch.library.opcheck(ops.nm_linear, (x, values, meta, 2, 4, bias))
    torch.library.opcheck(ops.nm_linear_wq, (x, codes, qmeta, scale, zero, 2, 4, "int4", 32, None))
    torch.library.opcheck(ops.w8a8_linear, (x, c8, m8, s8, 2, 4, torch.tensor(0.05), bias))
    fake = ops.nm_linear._opoverload(torch.empty(5, 64, device="meta"), values.to("meta"), meta.to("meta"), 2, 4)
    assert fake.shape == (5, 24) and fake.device.type == "meta"
