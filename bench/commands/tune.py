"""``python -m bench tune``: more trials for one candidate's studies in a run, from any
number of processes or machines (their storage shared)."""

from __future__ import annotations

from pathlib import Path

from bench.config import load_config
from bench.run.prepare import prepare_run
from bench.run.rundir import RunDir
from bench.run.runner import cli_data
from bench.run.tuning import candidate_tuning
from bench.run.units import tune_unit
from core import registry
from core.errors import BenchError
from core.progress import warn


def tune_from_args(
    config=None,
    profile=None,
    data=None,
    out=None,
    candidate=None,
    trials=None,
    fold=None,
    storage=None,
):
    """``python -m bench tune``: add trials to the studies of ``candidate`` in a run.

    A run directory that already holds a run is used as it is (its own config, data and
    folds); a new one is prepared first from ``config``/``profile``/``data``. Yields
    ``(fold, best_params, tuning_info)`` per fold once its study holds ``trials`` trials.
    """
    run = RunDir(Path(out).expanduser()) if out else None
    if run is None or not run.is_run():
        cfg = load_config(config, profile=profile, data=cli_data(data, config), out=out)
        if storage:
            cfg.override("tuning", storage=storage)
        run = prepare_run(cfg)[0]
    cands = run.config.candidates
    if candidate not in cands:
        raise BenchError(
            f"{run.path}: no candidate '{candidate}' in this run; known: {list(cands)}"
        )
    registry.import_plugins(run.config.run.plugins)
    if not registry.get(cands[candidate].type).tunable:
        raise BenchError(
            f"candidate '{candidate}' ({cands[candidate].type}) has no param_space: nothing to tune"
        )
    own = candidate_tuning(run.config.tuning, cands[candidate])
    n = int(own.trials if trials is None else trials)
    if n < 1:
        raise BenchError("nothing to tune: pass --trials N or set [tuning] trials")
    n_folds = int(run.config.run.folds)
    if fold is not None and not 0 <= fold < n_folds:
        raise BenchError(f"--fold must be in 0..{n_folds - 1}, got {fold}")
    configured = own.storage
    if storage and storage != configured:
        warn(
            f"--storage differs from the run's [tuning] storage "
            f"({configured or 'SQLite in the run directory'}): its work units will not see "
            "these trials"
        )
    for k in [fold] if fold is not None else range(n_folds):
        best, tuning = tune_unit(run, candidate, k, trials=n, storage=storage)
        yield k, best, tuning
