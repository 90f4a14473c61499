"""Outputs that appear whole or not at all: write into a hidden temporary directory, rename on success.

Every writer of a directory (artifact, hf-dense export, converted alias cache) and the ONNX export
(a file, its external data and side files, into a new or an existing directory) goes through
`atomic_dir`, so that an error or an interrupt at any point leaves nothing behind: no partial
output and no temporary directory. The temporary directory sits beside the output (same file
system, so the final rename is atomic) and is hidden (``.NAME.tmp-XXXX``).
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from sparsify.errors import UserError


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
    The parent of ``out`` must exist. The result gets mode 0755 (``mkdtemp`` creates 0700).
    """
    out = Path(out)
    where = out if merge and out.is_dir() else out.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=where))
    try:
        yield tmp
        tmp.chmod(0o755)
        _commit(tmp, out, overwrite, keep_if, merge)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed


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
