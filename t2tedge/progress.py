"""One place for progress bars and console output, so every long stage looks the same."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

# Logs go to stderr; when it is a file or pipe, keep lines long enough not to wrap mid-message.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar on stderr (plain and quiet when stderr is not a terminal)."""
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        yield from progress.track(items, total=total, description=description)


@contextlib.contextmanager
def progress_task(description: str, total: float) -> Iterator[Callable[[float], None]]:
    """A progress bar advanced by hand (e.g. by seconds spent): yields ``advance(amount)``."""
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=total)
        yield lambda amount: progress.advance(task, amount)


def log(message: str) -> None:
    """A status line on stderr (stdout stays for results)."""
    console.print(message, highlight=False)
