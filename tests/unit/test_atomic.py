"""`atomic_dir`: an output appears whole or not at all, and nothing temporary is ever left behind."""
from __future__ import annotations

import pytest

from sparsify.atomic import atomic_dir
from sparsify.errors import UserError


def test_success_renames_into_place(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "a.txt").write_text("a")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "a.txt").read_text() == "a"
    assert out.stat().st_mode & 0o777 == 0o755


def test_error_inside_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UserError, match="choose another output path"):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in out.iterdir()] == ["old.txt"]
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in out.iterdir()] == ["new.txt"]


def test_error_with_overwrite_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, overwrite=True):
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in out.iterdir()] == ["old.txt"]


def test_keep_if_keeps_a_complete_copy_made_meanwhile(tmp_path):
    out = tmp_path / "cache"
    complete = lambda d: (d / "config.json").exists()  # noqa: E731
    with atomic_dir(out, keep_if=complete) as tmp:
        (tmp / "config.json").write_text("ours")
        out.mkdir()  # another process finished first
        (out / "config.json").write_text("theirs")
    assert (out / "config.json").read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    (out / "config.json").unlink()  # an incomplete leftover is replaced when overwriting
    with atomic_dir(out, keep_if=complete, overwrite=True) as tmp:
        (tmp / "config.json").write_text("ours")
    assert (out / "config.json").read_text() == "ours"


def test_merge_into_new_and_existing_directory(tmp_path):
    out = tmp_path / "onnx"
    with atomic_dir(out, merge=True) as tmp:  # a new directory appears whole
        assert tmp.parent == tmp_path
        (tmp / "model.onnx").write_text("m")
        (tmp / "config.json").write_text("c")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx"]
    with atomic_dir(out, merge=True) as tmp:  # files join an existing one; files already there stay
        assert tmp.parent == out
        (tmp / "b.onnx").write_text("b")
        (tmp / "config.json").write_text("other")
    assert sorted(p.name for p in out.iterdir()) == ["b.onnx", "config.json", "model.onnx"]
    assert (out / "config.json").read_text() == "c"
    with pytest.raises(ValueError):
        with atomic_dir(out, merge=True) as tmp:
            (tmp / "c.onnx").write_text("c")
            raise ValueError
    assert sorted(p.name for p in out.iterdir()) == ["b.onnx", "config.json", "model.onnx"]


def _age(path, seconds=3600):
    import os
    import time

    os.utime(path, (time.time() - seconds, time.time() - seconds))


def test_stale_temporaries_of_dead_runs_are_removed_live_ones_kept(tmp_path):
    """Unlocked and unchanged for STALE_AFTER_S: a dead run's. Locked (a live run) or recent: left alone."""
    import fcntl
    import os

    dead, live, young, other = (tmp_path / n for n in (".out.tmp-dead", ".out.tmp-live", ".out.tmp-young",
                                                        ".other.tmp-x"))
    for d in (dead, live, young, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 10)
    for d in (dead, live, other):
        _age(d)
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a concurrent run holds its own
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a").write_text("a")
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-x", ".out.tmp-live", ".out.tmp-young", "out"]


def test_a_run_locks_its_own_temporary(tmp_path):
    import fcntl
    import os

    with atomic_dir(tmp_path / "out") as tmp:
        fd = os.open(tmp, os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_output_modes_follow_the_umask(tmp_path, mask):
    import os
    import stat
    import tempfile

    old = os.umask(mask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            fd, name = tempfile.mkstemp(dir=tmp)  # 0600, as some writers make them
            os.close(fd)
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "f").write_text("f")
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "run.sh").chmod(0o700)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert mode.pop("out") == mode.pop("sub") == 0o777 & ~mask
    assert mode.pop("run.sh") == 0o766 & ~mask  # keeps the execute bit it had
    assert set(mode.values()) == {0o666 & ~mask}
