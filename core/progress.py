"""Progress bars (rich), the console every command prints through, and stage timers."""

from __future__ import annotations

import logging
import os
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

# Messages go through the standard ``logging`` module (logger ``bloodbench``), written to
# stderr by one handler: ``info`` lines as they are, ``warning:`` lines in yellow on a
# terminal. The level follows ``-q`` (warnings and errors only, no progress) and ``-v``
# (debug lines too, and TensorFlow's start-up lines: core.quiet), passed to worker
# processes as $BLOODBENCH_VERBOSITY (-1, 0 or 1).
log = logging.getLogger("bloodbench")
VERBOSITY_ENV = "BLOODBENCH_VERBOSITY"
_LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


class _ConsoleHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        text = escape(safe_text(record.getMessage()))
        if record.levelno >= logging.WARNING:
            text = f"[yellow]warning:[/yellow] {text}"
        # "[run] folds" is text, not rich markup; written to a file or a pipe, a line stays
        # one line (grep finds paths and warnings)
        console.print(text, soft_wrap=not console.is_terminal)


def verbosity() -> int:
    """-1 (quiet), 0 or 1 (verbose), from $BLOODBENCH_VERBOSITY."""
    try:
        return max(-1, min(1, int(os.environ.get(VERBOSITY_ENV, "0") or 0)))
    except ValueError:
        return 0


def set_verbosity(level: int) -> None:
    """Set this process's level and the one its worker processes start with."""
    level = max(-1, min(1, int(level)))
    os.environ[VERBOSITY_ENV] = str(level)
    log.setLevel(_LEVELS[level])


if not any(isinstance(h, _ConsoleHandler) for h in log.handlers):
    log.addHandler(_ConsoleHandler())
    log.propagate = False
log.setLevel(_LEVELS[verbosity()])


def quiet() -> bool:
    """``-q``: no progress bars or lines, no info lines."""
    return log.getEffectiveLevel() > logging.INFO


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
    if not enabled or quiet():
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
    instead when stderr is not a terminal; nothing with ``-q``)."""
    if quiet():

        def advance_quiet(label: str = "", done: bool = True):
            pass

        yield advance_quiet
        return
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
    log.info(str(msg))


def warn(msg: str) -> None:
    log.warning(str(msg))


def debug(msg: str) -> None:
    """A line shown with ``-v`` only."""
    log.debug(str(msg))
