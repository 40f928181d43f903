"""Progress bars (rich) and the console every command prints through."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

console = Console(stderr=True, highlight=False)


def _columns():
    return (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())


def progress_iter(iterable, total: int | None = None, desc: str = "", enabled: bool = True):
    """Iterate with a progress bar on stderr (silent when ``enabled`` is false)."""
    if not enabled:
        yield from iterable
        return
    with Progress(*_columns(), console=console, transient=not console.is_terminal) as prog:
        task = prog.add_task(desc, total=total)
        for item in iterable:
            yield item
            prog.advance(task)


@contextmanager
def unit_progress(total: int, desc: str = "work units"):
    """A bar for work units; yields ``advance(label)`` to call after each unit."""
    with Progress(*_columns(), TextColumn("{task.fields[current]}"), console=console) as prog:
        task = prog.add_task(desc, total=total, current="")

        def advance(label: str = "", done: bool = True):
            prog.update(task, advance=1 if done else 0, current=label)
        yield advance


def info(msg: str) -> None:
    console.print(escape(str(msg)))   # "[run] folds" is text, not rich markup


def warn(msg: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {escape(str(msg))}")


def error_line(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
