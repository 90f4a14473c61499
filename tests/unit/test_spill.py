"""Calibration activations on disk (issue #15 item 2): the same artifact as in memory, files gone after.

The reference is the in-memory run on the same model and data: every tensor must be bit-identical,
since the disk store hands back the exact bytes it was given.
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny

from sparsify.calibrate.spill import DiskActivations, spill_dir
from sparsify.config import CalibConfig, PruneConfig
from sparsify.errors import UserError
from sparsify.exporters.safetensors_io import read_tensors
from sparsify.pipeline import prune

CALIB = CalibConfig(samples=64, seq_len=64, batch_size=2)  # activations (1 MiB) outweigh a tiny block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_disk_store_round_trips_bit_exactly(dtype, tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 7, 5), (1, 1, 1), (2, 13, 33)]
    xs = [(torch.randn(s, generator=g) * 1e3).to(dtype) for s in shapes]
    xs[0][0, 0, 0], xs[1][0, 0, 0] = float("-0.0"), float("nan")
    store = DiskActivations(tmp_path)
    for x in xs:
        store.append(x)
    assert len(store) == 3 and store.nbytes == sum(x.numel() * x.element_size() for x in xs)
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    back = list(store)
    assert all(b.dtype == dtype and b.shape == x.shape and torch.equal(b.view(bits), x.view(bits))
               for b, x in zip(back, xs))  # bits, so -0.0 and NaN count
    assert list(store) and len(list(tmp_path.iterdir())) == 1
    store.clear()
    assert len(store) == 0 and not list(tmp_path.iterdir())


def test_spill_dir_is_removed_even_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with spill_dir(tmp_path / "out") as d:
            DiskActivations(d).append(torch.ones(4))
            raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("family, kw", [
    ("llama", {"method": "sparsegpt", "scheme": "2:4"}),
    ("bert", {"method": "wanda", "scheme": "unstructured"}),
])
def test_activations_on_disk_give_the_in_memory_artifact(family, kw, tmp_path, monkeypatch):
    src = make_tiny(family, tmp_path / family)
    written = []
    append = DiskActivations.append
    monkeypatch.setattr(DiskActivations, "append", lambda self, x: (written.append(self.dir), append(self, x)))
    runs = {}
    for where in ("memory", "disk"):
        runs[where] = prune(str(src), PruneConfig(calib=CALIB, activations=where, **kw), tmp_path / where)
    assert len(written) == 64 // 2 * 2  # block 0's inputs and block 1's, one file per batch
    t1, t2 = read_tensors(tmp_path / "memory"), read_tensors(tmp_path / "disk")
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([family, "memory", "disk"])  # scratch removed


def test_auto_spills_when_memory_cannot_hold_the_activations(tmp_path):
    """--activations auto under --max-memory: disk exactly when the in-memory plan exceeds the cap."""
    src = make_tiny("llama", tmp_path / "llama")

    def run(label, **kw):
        return prune(str(src), PruneConfig(method="wanda", calib=CALIB, **kw), tmp_path / label)

    in_memory = run("m", max_memory="1GB", activations="memory")["streaming"]
    on_disk = run("d", max_memory="1GB", activations="disk")["streaming"]
    assert on_disk["planned_peak_bytes"] < in_memory["planned_peak_bytes"]
    between = (on_disk["planned_peak_bytes"] + in_memory["planned_peak_bytes"]) // 2
    assert run("a1", max_memory="1GB")["streaming"]["activations"] == "memory"
    auto = run("a2", max_memory=str(between))
    assert auto["streaming"]["activations"] == "disk"
    t1, t2 = read_tensors(tmp_path / "m"), read_tensors(tmp_path / "a2")
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    with pytest.raises(UserError, match="--activations disk"):
        run("refused", max_memory=str(between), activations="memory")
    assert not (tmp_path / "refused").exists()


def test_bad_activations_value():
    with pytest.raises(UserError, match="--activations 'ssd': use auto, memory, disk"):
        PruneConfig(activations="ssd")
