"""Outputs that appear whole or not at all: write into a hidden temporary directory, rename on success.

Every writer of a directory (artifact, hf-dense export, converted alias cache) and the ONNX export
(a file, its external data and side files, into a new or an existing directory) goes through
`atomic_dir`, so that an error or an interrupt at any point leaves nothing behind: no partial
output and no temporary directory. The temporary directory sits beside the output (same file
system, so the final rename is atomic) and is hidden (``.NAME.tmp-XXXX``).

A run killed outright (SIGKILL, power loss) cannot clean up: the next run writing the same output
removes the temporaries such runs left. The rule: a ``.NAME.tmp-*`` directory beside the output (or
inside it, for merge mode) is stale, and removed, when no live process holds its lock (each run
holds an exclusive ``flock`` on its own temporary directory until it ends; the kernel drops it when
the process dies) and its mtime is `STALE_AFTER_S` seconds old (a concurrent run locks its directory
microseconds after creating it, so one caught in between is never touched). Two concurrent runs of
the same output thus never delete each other's work. SIGTERM is turned into an exception by the
CLI, so it cleans up as Ctrl-C does. The output gets the user's umask (``mkdtemp`` makes 0700, and
some writers make 0600 files): directories 0777 & ~umask, files 0666 & ~umask (plus the execute
bits they had).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from sparsify.errors import UserError

STALE_AFTER_S = 10.0  # an unlocked temporary this old (mtime) belongs to no live run


@contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False, keep_if: Callable[[Path], bool] | None = None,
               merge: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it becomes ``out``, on any error it is removed.

    When ``out`` exists at the end (it may have appeared meanwhile):
      ``merge=True``        the files are moved into it one by one; files already there are left as they are
                            (callers check beforehand that such files are the same, e.g. copied configs);
      ``keep_if(out)``      true: ``out`` is kept and ours dropped (a cache another process filled first);
      ``overwrite=True``    ``out`` is replaced (moved aside, ours renamed in, the old one removed);
      otherwise             UserError, and ours is removed.
    The parent of ``out`` must exist. Stale temporaries of killed runs are removed first (module
    docstring); the result gets the user's umask.
    """
    out = Path(out)
    where = out if merge and out.is_dir() else out.parent
    remove_stale(where, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=where))
    lock = _lock(tmp)
    try:
        yield tmp
        apply_umask(tmp)
        _commit(tmp, out, overwrite, keep_if, merge)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed
        os.close(lock)


def _lock(directory: Path) -> int:
    """An exclusive flock on ``directory`` (held through its file descriptor until closed or the process dies)."""
    fd = os.open(directory, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_stale(where: Path, name: str) -> list[Path]:
    """Remove ``where/.NAME.tmp-*`` directories left by dead runs (unlocked, mtime STALE_AFTER_S old)."""
    removed, before = [], time.time() - STALE_AFTER_S
    for tmp in where.glob(f".{name}.tmp-*"):
        try:
            if not tmp.is_dir() or tmp.is_symlink() or tmp.stat().st_mtime >= before:
                continue
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its run is alive
        except OSError:
            continue
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        finally:
            os.close(fd)
    return removed


def umask() -> int:
    """The process umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir`` / ``open`` would have made."""
    mask = umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o777 & ~mask)
        else:
            path.chmod((0o666 | (path.stat().st_mode & 0o111)) & ~mask)


def _commit(tmp: Path, out: Path, overwrite: bool, keep_if, merge: bool) -> None:
    if merge and out.is_dir():
        for f in sorted(tmp.iterdir()):
            if not (out / f.name).exists():
                f.replace(out / f.name)
        return
    if out.exists():
        if keep_if is not None and keep_if(out):
            return
        if not overwrite:
            raise UserError(f"{out} appeared while sparsify was writing it: choose another output path")
        trash = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
        out.rename(trash)
        try:
            tmp.rename(out)
        except BaseException:
            trash.rename(out)  # put the old output back
            raise
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        tmp.rename(out)
    except OSError:  # out appeared between the check and the rename (another process)
        if keep_if is None or not keep_if(out):
            raise
