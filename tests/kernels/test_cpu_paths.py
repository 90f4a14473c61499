"""CPU paths of the packed linear against `sparsify.kernels.reference`: our C kernel on 2:4 weights
(float32 / int8 / int4 per channel and grouped, symmetric and not, w8a8), torch's int8 / int4 kernels,
CSR and BSR; awkward shapes (odd out, in not a multiple of the 32-column block, partial quant groups,
token counts across the kernel's 8-token passes); fallbacks when a kernel cannot take a shape or the
C kernel cannot be built; SPARSIFY_CPU_CACHE and the bytes each path holds.

Tolerances come from the arithmetic (`reference.matmul_error_bound`): two float32 evaluations of the
same x @ W^T may each differ from the exact value by (K + 4) * 2**-24 * (|x| @ |W|^T + |b|).
"""
import pytest
import torch

from sparsify import formats, kernels
from sparsify.errors import UserError
from sparsify.kernels import reference as R
from sparsify.kernels.cpu import native, paths
from sparsify.quant import rtn
from sparsify.quant.spec import QuantSpec

SPECS = {"float": None, "int8": QuantSpec("int8"), "int4-g32": QuantSpec("int4", 32),
         "int4-g64-asym": QuantSpec("int4", 64, False), "int4-channel": QuantSpec("int4", None),
         "int4-channel-asym": QuantSpec("int4", None, False), "w8a8": QuantSpec.parse("w8a8")}
SHAPES = [(7, 36), (33, 100), (17, 1540), (48, 96)]  # (out, in): odd out, in % 32 != 0, partial groups


def packed(out, inp, spec, seed, fmt="nm", n=2, m=4):
    w = R.random_nm_weight(out, inp, n, m, seed=seed, full=False)
    params = None
    if spec is not None:
        w, params = rtn.fake_quantize(w, spec)
    return formats.pack(fmt, w, **({"n": n, "m": m} if fmt == "nm" else {}), quant=params)


def check(y, x, tensors, attrs, fmt="nm", bias=None, slack=2.0):
    """y against the reference, within ``slack`` times the float32 bound (w8a8: on the rounded x)."""
    want = R.linear(x, fmt, tensors, attrs, bias)
    xq = R.quantize_activations_ref(x, R.act_scale(tensors, attrs)) if attrs.get("activations") else x
    bound = R.matmul_error_bound(xq, formats.unpack(fmt, tensors, attrs), bias)
    assert ((y.double() - want.double()).abs() <= slack * bound).all(), (y - want).abs().max()


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nm24_kernel_matches_reference(spec, shape):
    if native.unavailable():
        pytest.skip(native.unavailable())
    tensors, attrs = packed(*shape, SPECS[spec], seed=sum(shape))
    g = torch.Generator().manual_seed(shape[0])
    for tokens in (1, 3, 9, 17):  # 9, 17: a second (and third) 8-token pass over the same row
        x, bias = torch.randn(tokens, shape[1], generator=g), torch.randn(shape[0], generator=g)
        assert paths.PATHS["cpu-nm24"].accepts(x, "nm", attrs, tensors)
        check(paths.PATHS["cpu-nm24"].run(x, "nm", tensors, attrs, bias), x, tensors, attrs, bias=bias)
    kind = "int8" if spec == "w8a8" else attrs.get("quant") or "float"
    assert torch.equal(native.nm24_unpack(tensors, attrs, kind), formats.unpack("nm", tensors, attrs))  # bit-exact


@pytest.mark.parametrize("spec", ["int8", "int4-g32", "int4-g64-asym", "int4-channel"])
def test_torch_weight_only_kernels_match_reference(spec):
    """torch's int8 / int4 kernels on 48 x 192 (their shape rules hold), float32 and bfloat16 activations."""
    name = "torch-int8pack" if spec == "int8" else "torch-int4pack"
    tensors, attrs = packed(48, 192, SPECS[spec], seed=3)
    dense = formats.unpack("nm", tensors, attrs)  # (out, in) float32
    scales = tensors["scale"][:, torch.arange(192) // attrs["group_size"]]  # (out, in)
    for dtype, unit in ((torch.float32, 2.0 ** -24), (torch.bfloat16, 2.0 ** -8)):
        x = torch.randn(3, 192, generator=torch.Generator().manual_seed(4)).to(dtype)
        assert paths.PATHS[name].accepts(x, "nm", attrs, tensors)
        y = paths.PATHS[name].run(x, "nm", tensors, attrs, None).double()
        # int4's zero point enters as (8 - zero) * scale beside (q - 8) * scale: |each| <= 8 scales
        bound = R.matmul_error_bound(x.float(), dense.abs() + 16 * scales, unit=unit, extra=8)
        assert ((y - x.double() @ dense.double().T).abs() <= bound).all()


def test_shapes_the_kernels_cannot_take_fall_back(monkeypatch):
    monkeypatch.delenv("SPARSIFY_CPU_CACHE", raising=False)
    x = torch.randn(1, 36, dtype=torch.bfloat16)
    for spec in ("int8", "int4-g32"):  # in = 36: torch's kernels need a multiple of 32 (and out of 16)
        tensors, attrs = packed(17, 36, SPECS[spec], seed=5)
        torch_path = paths.PATHS["torch-int8pack" if spec == "int8" else "torch-int4pack"]
        assert not torch_path.accepts(x, "nm", attrs, tensors)
        assert kernels.kernel_name(x, "nm", attrs, tensors) == "cpu-unpack"
        torch.testing.assert_close(kernels.linear(x, "nm", tensors, attrs), R.linear(x, "nm", tensors, attrs))
    tensors, attrs = packed(16, 64, None, seed=6, n=4, m=8)  # 4:8, fp8 codes, bf16 values: not the C kernel's
    assert kernels.kernel_name(torch.randn(1, 64), "nm", attrs, tensors) == "cpu-unpack"
    tensors, attrs = packed(16, 64, QuantSpec("fp8"), seed=6)
    x = torch.randn(1, 64)
    assert kernels.kernel_name(x, "nm", attrs, tensors) == "cpu-unpack"
    torch.testing.assert_close(kernels.linear(x, "nm", tensors, attrs), R.linear(x, "nm", tensors, attrs))
    tensors, attrs = formats.pack("nm", R.random_nm_weight(16, 64, 2, 4, dtype=torch.bfloat16), n=2, m=4)
    assert kernels.kernel_name(torch.randn(1, 64, dtype=torch.bfloat16), "nm", attrs, tensors) == "cpu-unpack"


def test_without_a_compiler_the_torch_paths_run(monkeypatch):
    monkeypatch.setattr(native, "_STATE", {"lib": None, "why": "the CPU kernel could not be built (no cc)"})
    tensors, attrs = packed(33, 100, SPECS["int8"], seed=7)
    x = torch.randn(2, 100)
    assert native.unavailable().endswith("(no cc)")
    assert kernels.kernel_name(x, "nm", attrs, tensors) == "cpu-unpack"
    check(kernels.linear(x, "nm", tensors, attrs), x, tensors, attrs)


def test_token_limits_and_the_dense_cache(monkeypatch):
    if native.unavailable():
        pytest.skip(native.unavailable())
    tensors, attrs = packed(24, 64, SPECS["int8"], seed=8)
    with_cache, without = paths.CPU_MAX_TOKENS[("cpu-nm24", "int8", "float32")]
    monkeypatch.delenv("SPARSIFY_CPU_CACHE", raising=False)
    assert kernels.kernel_name(torch.randn(without, 64), "nm", attrs, tensors) == "cpu-nm24"
    x = torch.randn(without + 1, 64)
    kernels._CACHE.clear()
    assert kernels.kernel_name(x, "nm", attrs, tensors) == "cpu-unpack"
    check(kernels.linear(x, "nm", tensors, attrs), x, tensors, attrs)
    assert kernels.cache_bytes() == {}  # rebuilt per call, nothing held
    monkeypatch.setenv("SPARSIFY_CPU_CACHE", "1")  # the dense weight is the rival now: a lower limit
    assert kernels.kernel_name(torch.randn(with_cache, 64), "nm", attrs, tensors) == "cpu-nm24"
    x = torch.randn(with_cache + 1, 64)
    assert kernels.kernel_name(x, "nm", attrs, tensors) == "dense-cached"
    check(kernels.linear(x, "nm", tensors, attrs), x, tensors, attrs)
    assert kernels.cache_bytes() == {"dense": 24 * 64 * 4}
    kernels._CACHE.clear()
    monkeypatch.setenv("SPARSIFY_CPU_CACHE", "maybe")
    with pytest.raises(UserError, match="SPARSIFY_CPU_CACHE"):
        kernels.kernel_name(x, "nm", attrs, tensors)


def test_csr_and_bsr_for_sparse_enough_weights():
    g = torch.Generator().manual_seed(9)
    w = torch.where(torch.rand(40, 50, generator=g) < 0.05, torch.randn(40, 50, generator=g), 0.0)
    tensors, attrs = formats.pack("bitmask", w)
    x = torch.randn(3, 50, generator=g)
    kernels._CACHE.clear()
    assert kernels.kernel_name(x, "bitmask", attrs, tensors) == "cpu-csr"
    check(kernels.linear(x, "bitmask", tensors, attrs), x, tensors, attrs, fmt="bitmask")
    nnz = tensors["values"].numel()
    assert kernels.cache_bytes() == {"csr": nnz * (4 + 4) + 41 * 4}  # values, int32 columns, int32 row offsets
    kernels._CACHE.clear()
    keep = torch.zeros(110, 100, dtype=torch.bool)  # 7 x 7 tiles of 16 x 16, the last row and column padded
    keep[16:32, 32:48] = keep[96:, 96:] = True  # an inner tile and the corner edge tile
    w = torch.where(keep, torch.randn(110, 100, generator=g), 0.0)
    tensors, attrs = formats.pack("bsr", w, block=(16, 16))
    assert tensors["values"].shape[0] == 2 and paths.density("bsr", attrs, tensors) <= 0.05
    x = torch.randn(3, 100, generator=g)
    assert kernels.kernel_name(x, "bsr", attrs, tensors) == ("cpu-bsr" if native.unavailable() else "cpu-bsr-c")
    check(kernels.linear(x, "bsr", tensors, attrs), x, tensors, attrs, fmt="bsr")
    check(paths.PATHS["cpu-bsr"].run(x, "bsr", tensors, attrs, None), x, tensors, attrs, fmt="bsr")
    assert kernels.cache_bytes() == {}  # both BSR paths run on the packed tensors themselves


def bsr_weight(out, inp, block, density, seed):
    """A random float32 (out, in) weight with whole tiles zero (+0.0), packed as ``bsr``."""
    g = torch.Generator().manual_seed(seed)
    r, c = block
    keep = torch.rand(-(-out // r), -(-inp // c), generator=g) < density
    keep = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:out, :inp]
    return formats.pack("bsr", torch.where(keep, torch.randn(out, inp, generator=g), 0.0), block=block)


@pytest.mark.parametrize("block", [(16, 16), (32, 8), (8, 16), (16, 32), (3, 5)], ids=str)
@pytest.mark.parametrize("shape", [(50, 37), (96, 80), (33, 100)], ids=str)
def test_bsr_c_kernel_matches_reference(block, shape):
    """Edge tiles on both sides, R % 16 != 0 (scalar loop), C % 16 != 0, token counts across the decode
    path (< 8), the 12-token register pass and the 96-token panel; an empty block row included."""
    if native.unavailable():
        pytest.skip(native.unavailable())
    tensors, attrs = bsr_weight(*shape, block, 0.4, seed=sum(shape) + block[0])
    g = torch.Generator().manual_seed(shape[1])
    for tokens in (1, 3, 7, 8, 13, 97):
        x, bias = torch.randn(tokens, shape[1], generator=g), torch.randn(shape[0], generator=g)
        assert paths.PATHS["cpu-bsr-c"].accepts(x, "bsr", attrs, tensors)
        y = paths.PATHS["cpu-bsr-c"].run(x, "bsr", tensors, attrs, bias)
        want = R.bsr_linear_ref(x, tensors["values"], tensors["col_idx"], tensors["row_ptr"], attrs["shape"], bias)
        bound = R.matmul_error_bound(x, formats.unpack("bsr", tensors, attrs), bias)
        assert ((y.double() - want.double()).abs() <= 2 * bound).all(), (y - want).abs().max()
    empty, attrs = bsr_weight(*shape, block, 0.0, seed=1)  # no tile at all: y is the bias
    assert torch.equal(native.bsr_linear(x, empty, attrs, bias), bias.expand(x.shape[0], -1))


def test_bsr_c_kernel_limits_and_custom_op(monkeypatch):
    """Dense enough weights and bfloat16 go elsewhere; the op `torch.compile` traces agrees with the call."""
    if native.unavailable():
        pytest.skip(native.unavailable())
    monkeypatch.delenv("SPARSIFY_CPU_CACHE", raising=False)
    ceiling = paths.SPARSE_MAX_TOKENS["cpu-bsr-c"][0][0]
    dense_ish, attrs = bsr_weight(64, 64, (16, 16), 1.0, seed=2)
    assert paths.density("bsr", attrs, dense_ish) > ceiling
    assert kernels.kernel_name(torch.randn(4, 64), "bsr", attrs, dense_ish) == "cpu-unpack"
    tensors, attrs = bsr_weight(64, 64, (16, 16), 0.2, seed=3)
    assert not paths.PATHS["cpu-bsr-c"].accepts(torch.randn(2, 64, dtype=torch.bfloat16), "bsr", attrs, tensors)
    from sparsify.kernels.ops import cpu_bsr_linear

    x, bias = torch.randn(2, 5, 64), torch.randn(64)
    args = (x, tensors["values"], tensors["col_idx"], tensors["row_ptr"], 64, bias)
    torch.library.opcheck(torch.ops.sparsify.cpu_bsr_linear.default, args)
    check(cpu_bsr_linear(*args).reshape(10, 64), x.reshape(10, 64), tensors, attrs, fmt="bsr", bias=bias)


def test_the_c_kernel_custom_op_for_torch_compile():
    """What `torch.compile` traces instead of the ctypes call: schema, fake impl, real impl agree."""
    if native.unavailable():
        pytest.skip(native.unavailable())
    from sparsify.kernels.ops import cpu_nm24_linear

    tensors, attrs = packed(16, 64, SPECS["int4-g32"], seed=10)
    x, bias = torch.randn(2, 3, 64), torch.randn(16)
    args = (x, tensors["values"], tensors["meta"], tensors["scale"], None, 16, 32, "int4", bias)
    torch.library.opcheck(torch.ops.sparsify.cpu_nm24_linear.default, args)
    check(cpu_nm24_linear(*args).reshape(6, 16), x.reshape(6, 64), tensors, attrs, bias=bias)
