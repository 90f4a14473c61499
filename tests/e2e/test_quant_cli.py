"""2:4 + quantization end to end on a tiny Llama: packed sizes, grid, round trip through load."""
from __future__ import annotations

import pytest
import torch
from helpers import SMALL_CALIB, cli_json, dense_weights, nm_ok
from tiny_models import make_tiny

from sparsify.quant.spec import QuantSpec


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.mark.parametrize("method,quant,extra,limit", [  # limits: packed bytes over the same weights in fp16
    ("sparsegpt", "int8", [], 0.345), ("wanda", "int4", ["--group-size", "32"], 0.25 + 1e-9),
    ("sparsegpt", "fp8", [], 0.345), ("sparsegpt", "w8a8", [], 0.345)])  # in=64: the fp32 scale is 4 of 44 B/row
def test_24_quantized(llama, tmp_path, method, quant, extra, limit):
    out = tmp_path / "out"
    m = cli_json("prune", llama, "--method", method, "--scheme", "2:4", "--quant", quant, *extra, "-o", out,
                 *SMALL_CALIB)
    assert m["quant"]["kind"] == {"w8a8": "int8"}.get(quant, quant)
    # int4 g32: per 32 inputs 16 codes x 4 bits + 16 indices x 2 bits + one fp32 scale = 16 bytes of 64
    assert m["totals"]["packed_bytes"] / (m["totals"]["numel"] * 2) <= limit
    spec = QuantSpec.parse(quant, int(extra[1]) if extra else None)
    for name, w in dense_weights(out).items():
        assert nm_ok(w, 2, 4), name
        entry = m["tensors"][name + ".weight"]
        assert entry["attrs"]["quant"] == spec.kind and "scale" in entry["keys"]
        if spec.kind != "fp8":  # integer grid: w / scale is an integer (+ zero) everywhere
            size = entry["attrs"]["group_size"]
            from safetensors import safe_open

            with safe_open(str(out / "model.safetensors"), "pt") as f:
                scale = f.get_tensor(name + ".scale")
            q = w / scale.repeat_interleave(size, 1)[:, : w.shape[1]]
            torch.testing.assert_close(q, q.round(), atol=1e-3, rtol=0)
    ppl = cli_json("eval", out, "--windows", "2", "--seq-len", "32")["perplexity"]["perplexity"]
    assert ppl > 1
