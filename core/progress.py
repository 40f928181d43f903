"""Progress bars (rich), the console every command prints through, and stage timers."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from core.io import safe_text

console = Console(stderr=True, highlight=False)
PLAIN_INTERVAL = 60.0  # seconds between progress lines when stderr is not a terminal (a log)


def _columns():
    return (
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )


class _PlainProgress:
    """Progress for a log (stderr not a terminal), where a bar cannot redraw: a text line
    at most every ``PLAIN_INTERVAL`` seconds, and a last one when the work took that long,
    so a batch job's log says how far a long run has got without flooding it."""

    def __init__(self, desc: str, total: int | None):
        self.desc, self.total, self.done = desc, total, 0
        self.start = self.last = time.monotonic()

    def advance(self, n: int = 1, label: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PLAIN_INTERVAL:
            self.last = now
            self._line(label)

    def close(self) -> None:
        if time.monotonic() - self.start >= PLAIN_INTERVAL:
            self._line("done")

    def _line(self, label: str) -> None:
        seconds = int(time.monotonic() - self.start)
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        info(
            f"{self.desc}: {count} ({seconds // 60}:{seconds % 60:02d})"
            + (f" {label}" if label else "")
        )


def progress_iter(iterable, total: int | None = None, desc: str = "", enabled: bool = True):
    """Iterate with a progress bar on stderr (silent when ``enabled`` is false; occasional
    text lines when stderr is not a terminal)."""
    if not enabled:
        yield from iterable
        return
    if not console.is_terminal:
        plain = _PlainProgress(desc, total)
        for item in iterable:
            yield item
            plain.advance()
        plain.close()
        return
    with Progress(*_columns(), console=console) as prog:
        task = prog.add_task(desc, total=total)
        for item in iterable:
            yield item
            prog.advance(task)


@contextmanager
def unit_progress(total: int, desc: str = "work units"):
    """A bar for work units; yields ``advance(label)`` to call after each unit (text lines
    instead when stderr is not a terminal)."""
    if not console.is_terminal:
        plain = _PlainProgress(desc, total)

        def advance_plain(label: str = "", done: bool = True):
            plain.advance(1 if done else 0, label)

        yield advance_plain
        plain.close()
        return
    with Progress(*_columns(), TextColumn("{task.fields[current]}"), console=console) as prog:
        task = prog.add_task(desc, total=total, current="")

        def advance(label: str = "", done: bool = True):
            prog.update(task, advance=1 if done else 0, current=label)

        yield advance


@contextmanager
def stage(times: dict, name: str):
    """Record the wall time of the ``with`` block, in seconds, as ``times[name]`` (when
    the block finishes without an exception)."""
    t = time.perf_counter()
    yield
    times[name] = time.perf_counter() - t


def info(msg: str) -> None:
    # "[run] folds" is text, not rich markup; written to a file or a pipe, a line stays
    # one line (grep finds paths and warnings)
    console.print(escape(safe_text(str(msg))), soft_wrap=not console.is_terminal)


def warn(msg: str) -> None:
    console.print(
        f"[yellow]warning:[/yellow] {escape(safe_text(str(msg)))}",
        soft_wrap=not console.is_terminal,
    )
