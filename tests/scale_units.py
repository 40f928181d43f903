"""Tiny work units for the executor tests (stdlib only, so spawned workers start fast)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from core.errors import BenchError


def square(x):
    return x * x


def fail_once(marker, x):
    """Raises the first time (``marker`` absent), succeeds the second."""
    m = Path(marker)
    if not m.exists():
        m.write_text("failed once")
        raise RuntimeError("transient failure")
    return x


def die_once(marker, x):
    """Kills its own process the first time (``marker`` absent), succeeds the second."""
    m = Path(marker)
    if not m.exists():
        m.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return x + 100


def bad_setting(log):
    """A unit that stops with a BenchError (a bad setting): must not be retried."""
    with open(log, "a") as fh:
        fh.write("ran\n")
    raise BenchError("bad setting in the config")
