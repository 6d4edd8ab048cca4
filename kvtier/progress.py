"""Progress shown on stderr while something slow runs."""

from __future__ import annotations

import contextlib
import sys
import time

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


LINE_EVERY = 10.0  # seconds between the plain progress lines written where stderr is not a terminal


@contextlib.contextmanager
def bar(total: int, description: str):
    """A progress bar; yields ``advance(n)``. Where stderr is not a terminal (a log file, CI), a
    plain line instead, at most every ``LINE_EVERY`` seconds and when the last step is done."""
    if not _console.is_terminal:
        start = last = time.monotonic()
        done = 0

        def advance(n: int = 1) -> None:
            nonlocal done, last
            done += n
            now = time.monotonic()
            if now - last >= LINE_EVERY or done >= total:
                last = now
                m, s = divmod(int(now - start), 60)
                print(f"kvtier: {description}: {done}/{total} done, {m}m{s:02d}s", file=sys.stderr, flush=True)

        yield advance
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=_console,
                  disable=not _console.is_terminal) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)


def note(message: str) -> None:
    """One line on stderr that the user should see (e.g. files removed on their behalf)."""
    print(f"kvtier: {message}", file=sys.stderr, flush=True)
