"""Optuna storage from a URL: where studies live and how several processes share them.

* ``""`` (default): an SQLite file ``optuna.db`` in the run directory (nothing to start);
* ``sqlite:///path.db``: an SQLite file elsewhere;
* ``journal:///path.log`` or a path ending in ``.log``: Optuna's journal file, safe for
  several processes on one machine;
* ``postgresql://user:pass@host/db`` (or any SQLAlchemy URL): several machines.

Relational storages get a heartbeat, so trials of a worker that died are marked failed
and retried (``RetryHeartbeatStaleTrialCallback``) instead of being lost or left running forever.
:func:`optimize_shared` lets any number of processes fill one study to an exact total.
"""

from __future__ import annotations

import os
import random
import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from bench.run.rundir import RunDir
from core.errors import BenchError

# A running trial whose process sent no heartbeat for GRACE_SECONDS is failed and retried.
HEARTBEAT_SECONDS = int(os.environ.get("BLOODBENCH_OPTUNA_HEARTBEAT", 30))
GRACE_SECONDS = int(os.environ.get("BLOODBENCH_OPTUNA_GRACE", 120))
OPEN_ATTEMPTS = 6  # opening a storage that another process is creating: tries in all


def storage_url(url: str, run_dir) -> str:
    """The effective storage URL (the default SQLite file for an empty ``url``)."""
    if not url:
        return f"sqlite:///{RunDir(run_dir).optuna_db.resolve()}"
    return url


def make_storage(url: str, run_dir=None) -> optuna.storages.BaseStorage:
    """Build an Optuna storage from ``url`` (see the module docstring)."""
    url = storage_url(url, run_dir)
    journal = url.startswith("journal://") or url.endswith(".log")
    path = (
        Path(url.removeprefix("journal://"))
        if journal
        else (Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None)
    )
    if path is not None:  # a file storage: its folder must exist
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BenchError(
                f"cannot open Optuna storage {url}: cannot make the folder "
                f"{path.parent} ({exc.strerror})"
            ) from None
    if journal:  # journal:///abs/path.log -> /abs/path.log
        return JournalStorage(JournalFileBackend(str(path)))
    for attempt in range(OPEN_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # heartbeat options are marked experimental
                retry = RetryHeartbeatStaleTrialCallback(max_retry=3)
                return RDBStorage(
                    url,
                    heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=GRACE_SECONDS,
                    heartbeat_stale_trial_callback=retry,
                    engine_kwargs=None if url.startswith("sqlite") else {"pool_pre_ping": True},
                )
        except Exception as exc:  # noqa: BLE001 - driver and connection errors vary by backend
            if attempt + 1 < OPEN_ATTEMPTS and _lost_schema_race(exc):
                time.sleep(0.2 * 2**attempt + random.uniform(0, 0.2))
                continue
            raise BenchError(
                f"cannot open Optuna storage {url.split('@')[-1]}: {str(exc).splitlines()[0]}"
            ) from None


def _lost_schema_race(exc: Exception) -> bool:
    """Whether opening a storage failed because another process was creating its tables at
    the same moment (two work units that start together on a new run's SQLite file both
    insert Optuna's schema version): opening it again finds the tables made."""
    import sqlalchemy.exc

    text = str(exc)
    return (
        isinstance(exc, sqlalchemy.exc.IntegrityError)
        or "database is locked" in text
        or "already exists" in text
    )


# ----------------------------------------------------------------------------- shared studies

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _counts(study, before: int | None = None) -> tuple[int, int, int]:
    """(finished, running, waiting) trials; ``before``: only running ones numbered lower.

    Finished: complete, pruned or failed, but not a ``surplus`` trial and not a failed trial
    that the heartbeat callback queued again (its retry counts instead).
    """
    trials = study.get_trials(deepcopy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    f = r = w = 0
    for t in trials:
        if t.state == TrialState.WAITING:
            w += 1
        elif t.state == TrialState.RUNNING:
            r += before is None or t.number < before
        elif (
            t.state in FINISHED
            and not t.user_attrs.get("surplus")
            and not (t.state == TrialState.FAIL and t.number in retried)
        ):
            f += 1
    return f, r, w


def optimize_shared(
    study: optuna.Study,
    objective,
    n_trials: int,
    timeout: float | None = None,
    catch=(),
    max_wait: float = GRACE_SECONDS + HEARTBEAT_SECONDS,
    poll: float = 0.5,
    **optimize_kwargs,
) -> int:
    """Add trials to ``study`` until it holds exactly ``n_trials`` finished ones.

    Finished means complete, pruned or failed (a trial whose process died and that the
    heartbeat queued again counts once, by its retry). Any number of processes may call
    this on the same study at once: together they stop at ``n_trials``, whichever process
    ran which trial. ``study.optimize(n_trials=N)`` in each of them would run N trials
    *each*, and ``MaxTrialsCallback`` can overshoot by the trials in flight. Here a trial
    that starts while the finished trials and those running ahead of it (lower numbers)
    already make up the total is pruned at once, before it samples anything, and marked
    ``surplus`` (it does not count). While the last trials run elsewhere, this process
    waits for them: if one dies, a relational storage's heartbeat fails it and it is
    retried (see :func:`make_storage`); a running trial that does not change for
    ``max_wait`` seconds (a killed process on a journal file, which has no heartbeat) ends
    the wait. ``timeout`` (seconds) bounds this call.

    Returns the number of trials this process finished.
    """

    def guarded(trial):
        f, r, _ = _counts(trial.study, before=trial.number)
        if f + r >= n_trials:
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned("surplus: the study holds its trials")
        return objective(trial)

    mine = []  # this process's trials, as optimize's callbacks see them
    callbacks = [*(optimize_kwargs.pop("callbacks", None) or ()), lambda _s, t: mine.append(t)]
    deadline = time.monotonic() + timeout if timeout else None
    last, since = None, time.monotonic()
    while deadline is None or time.monotonic() < deadline:
        with warnings.catch_warnings():  # experimental; a no-op without a heartbeat
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)
        f, r, w = _counts(study)
        if f >= n_trials:
            break
        if f + r >= n_trials and not w:  # the last trials run elsewhere: wait for them
            if (f, r) != last:
                last, since = (f, r), time.monotonic()
            elif time.monotonic() - since > max_wait:
                break
            time.sleep(poll)
            continue
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        study.optimize(
            guarded, n_trials=1, timeout=left, catch=catch, callbacks=callbacks, **optimize_kwargs
        )
    return sum(t.state in FINISHED and not t.user_attrs.get("surplus") for t in mine)
