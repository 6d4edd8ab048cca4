"""Progress shown on stderr while something slow runs."""

from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

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


@contextlib.contextmanager
def bar(total: int, description: str):
    """A progress bar; yields ``advance(n)``. Hidden when stderr is not a terminal."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=_console,
                  disable=not _console.is_terminal) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)


def note(message: str) -> None:
    """One line on stderr that the user should see (e.g. files removed on their behalf)."""
    print(f"kvtier: {message}", file=sys.stderr, flush=True)
