"""Progress shown on stderr while something slow runs (silent when stderr is not a terminal)."""

from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

_console = Console(stderr=True)


@contextlib.contextmanager
def status(message: str):
    """A spinner with a message; a plain line when stderr is not a terminal."""
    if _console.is_terminal:
        with _console.status(message):
            yield
    else:
        print(f"kvtier: {message} ...", file=sys.stderr, flush=True)
        yield


def bar(total: int, description: str) -> Progress:
    """A progress bar; use ``with bar(n, "...") as (p, task): p.advance(task)``."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=_console,
                    disable=not _console.is_terminal, transient=False)
