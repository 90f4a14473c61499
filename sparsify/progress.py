"""Progress bars for long library work (rich, on stderr). Off with `set_enabled(False)` or SPARSIFY_PROGRESS=0."""
from __future__ import annotations

import os
from contextlib import contextmanager

_enabled = os.environ.get("SPARSIFY_PROGRESS", "1") != "0"


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = flag


@contextmanager
def bar(description: str, total: int):
    """Yields ``advance(n=1)``; draws a rich bar on stderr when enabled and stderr is a terminal or forced."""
    if not _enabled:
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
