"""Progress bars for long library work (rich, on stderr). Off with `set_enabled(False)` or SPARSIFY_PROGRESS=0.

`quiet()` keeps the libraries' own chatter (Python warnings, torch / ONNX exporter log lines such as
"torchvision is not installed") out of a command's output while it works: the bar says what is going on.
"""
from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager

QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir", "transformers")

_enabled = os.environ.get("SPARSIFY_PROGRESS", "1") != "0"


@contextmanager
def quiet():
    """Silence warnings and the exporters' loggers (below ERROR) inside the block; restore them after."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = flag


def is_enabled() -> bool:
    return _enabled


@contextmanager
def bar(description: str, total: int):
    """Yields ``advance(n=1, label=None)``; draws a rich bar on stderr when enabled and stderr is a terminal or
    forced. ``label`` names the step now starting (``description: label``), for work made of unlike steps."""
    if not _enabled:
        yield lambda n=1, label=None: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)

        def advance(n: int = 1, label: str | None = None) -> None:
            progress.update(task, advance=n, **({"description": f"{description}: {label}"} if label else {}))

        try:
            yield advance
        except BaseException:
            progress.live.transient = True  # on an error, its one line is all that stays on screen
            raise
