"""The streaming writer produces files that the official safetensors reader reads back bit-exactly."""
import json

import pytest
import torch
from safetensors import safe_open

from sparsify.exporters.safetensors_io import ShardedWriter, read_tensors


def _random_tensors():
    g = torch.Generator().manual_seed(1)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.half": torch.randn(3, 9, generator=g).half(),
        "c.bf16": torch.randn(4, generator=g).bfloat16(),
        "d.meta": torch.randint(0, 255, (5, 3), generator=g, dtype=torch.uint8),
        "e.idx": torch.arange(11, dtype=torch.int32),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.zeros(0, 4),
        "h.int8": torch.randint(-128, 127, (6,), generator=g, dtype=torch.int8),
    }


@pytest.mark.parametrize("max_shard", [1 << 30, 64])
def test_round_trip_bit_exact(tmp_path, max_shard):
    tensors = _random_tensors()
    w = ShardedWriter(tmp_path, max_shard_bytes=max_shard)
    for k, v in tensors.items():
        w.add(k, v)
    sizes = w.close(metadata={"format": "pt"})
    back = read_tensors(tmp_path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
    assert sum(sizes.values()) == sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    if max_shard == 64:
        assert len(sizes) > 1
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
    else:
        with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert not list(tmp_path.glob(".*.data"))


def test_duplicate_name_rejected(tmp_path):
    w = ShardedWriter(tmp_path)
    w.add("x", torch.zeros(2))
    with pytest.raises(ValueError):
        w.add("x", torch.zeros(2))
    w.abort()
    assert not list(tmp_path.iterdir())
