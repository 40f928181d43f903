"""Optuna storage from a URL: where studies live and how several processes share them.

* ``""`` (default): an SQLite file ``optuna.db`` in the run directory (nothing to start);
* ``sqlite:///path.db``: an SQLite file elsewhere;
* ``journal:///path.log`` or a path ending in ``.log``: Optuna's journal file, safe for
  several processes on one machine;
* ``postgresql://user:pass@host/db`` (or any SQLAlchemy URL): several machines.

Relational storages get a heartbeat, so trials of a worker that died are marked failed
and retried (``RetryHeartbeatStaleTrialCallback``) instead of being lost or left running forever.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import warnings

from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend

from bench.errors import BenchError

HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120


def storage_url(url: str, run_dir) -> str:
    """The effective storage URL (the default SQLite file for an empty ``url``)."""
    if not url:
        return f"sqlite:///{(Path(run_dir) / 'optuna.db').resolve()}"
    return url


def make_storage(url: str, run_dir=None) -> optuna.storages.BaseStorage:
    """Build an Optuna storage from ``url`` (see the module docstring)."""
    url = storage_url(url, run_dir)
    if url.startswith("journal://") or url.endswith(".log"):
        path = Path(url.removeprefix("journal://"))   # journal:///abs/path.log -> /abs/path.log
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # heartbeat options are marked experimental
            retry = RetryHeartbeatStaleTrialCallback(max_retry=3)
            return RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                          heartbeat_stale_trial_callback=retry,
                          engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite")
                          else None)
    except Exception as exc:  # noqa: BLE001 - driver and connection errors vary by backend
        raise BenchError(f"cannot open Optuna storage {url.split('@')[-1]}: "
                         f"{str(exc).splitlines()[0]}") from None
