"""Artifacts appear whole or not at all, and never over the input."""
import pytest
import torch

from sparsify.errors import UserError
from sparsify.exporters.artifact import ArtifactWriter, check_output, copy_side_files, read_manifest


def test_atomic_write_and_failure_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with ArtifactWriter(out) as w:
            w.tensors.add("x", torch.ones(3))
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with ArtifactWriter(out) as w:
        w.tensors.add("x", torch.ones(3))
        w.manifest = {"tensors": {}}
    m = read_manifest(out)
    assert m["format_version"] == 1 and m["files"]["model.safetensors"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_check_output_rules(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="overwrite the input"):
        check_output(src, [src], overwrite=True)
    with pytest.raises(UserError, match="overwrite the input"):
        check_output(tmp_path, [src], overwrite=True)
    with pytest.raises(UserError, match="overwrite the input"):
        check_output(src, [src / "model.safetensors"], overwrite=True)
    existing = tmp_path / "out"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        check_output(existing, [src], overwrite=False)
    with pytest.raises(UserError, match="not a sparsify artifact"):
        check_output(existing, [src], overwrite=True)
    with pytest.raises(UserError, match="does not exist"):
        check_output(tmp_path / "no" / "out", [src], overwrite=False)
    assert check_output(tmp_path / "fresh", [src], overwrite=False) == (tmp_path / "fresh").resolve()


def test_overwrite_replaces_artifact(tmp_path):
    out = tmp_path / "art"
    for value in (1.0, 2.0):
        with ArtifactWriter(out, overwrite=True) as w:
            w.tensors.add("x", torch.full((2,), value))
            w.manifest = {"v": value}
    assert read_manifest(out)["v"] == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_copy_side_files_skips_weights(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors", "pytorch_model.bin",
                 "model.safetensors.index.json", "vocab.txt"):
        (src / name).write_text("{}")
    dst = tmp_path / "dst"
    dst.mkdir()
    assert copy_side_files(src, dst) == ["config.json", "tokenizer.json", "vocab.txt"]


def test_read_manifest_errors(tmp_path):
    with pytest.raises(UserError, match="not a sparsify artifact"):
        read_manifest(tmp_path)
