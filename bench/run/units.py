"""One work unit: candidate x fold, fitted on the other folds, scored on its own.

Work units run wherever the scheduler sends them (this process, spawned workers, Dask
workers); each reads the run directory through :class:`bench.run.rundir.RunDir`, imports the
config's plugins itself, and publishes its folder atomically.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time

import numpy as np

from bench.run.rundir import RunDir
from bench.protocols.stress import predict_stressed, stress_shifts
from bench.data.sources import lab_balanced_rows
from bench.run.tuning import is_tuned, tune_candidate
from core import registry
from core.candidate import build_candidate, fit_candidate, predict_proba_for, release_memory
from core.colour import bag_jitter
from core.io import stable_hash
from core.metrics import fold_metrics


def seeded_entry(entry: dict, seed: int) -> dict:
    """Give the candidate the run's seed unless its params set one."""
    cls = registry.get(entry["type"])
    params = dict(entry.get("params", {}))
    names = cls().get_params(deep=False)
    for key in ("seed", "random_state"):
        if key in names and key not in params:
            params[key] = seed
    return {**entry, "params": params}


def _loaded(run) -> RunDir:
    run = run if isinstance(run, RunDir) else RunDir(run)
    registry.import_plugins(run.config.run.plugins)  # spawned/Dask workers too
    return run


def training_rows(run, entry: dict, fold: int, seed: int) -> np.ndarray:
    """The rows fold ``fold``'s fit and trials learn from: every other fold's, with
    ``lab_balance`` each lab drawn to the mean lab size (bench.data.sources.lab_balanced_rows)."""
    train = run.folds.train(fold)
    if entry.get("lab_balance") and run.domains is not None:
        train = lab_balanced_rows(train, run.domains, seed)
    return train


def training_images(run, rows: np.ndarray, fold: int) -> np.ndarray:
    """The images of training ``rows``; in a bag task with ``[patients] bag_jitter``,
    each bag's cells under one random per-channel gain drawn for this fold
    (:func:`core.colour.bag_jitter`): stain augmentation per smear, training rows only."""
    X = np.asarray(run.images[rows])
    strength = float(run.config.patients.bag_jitter)
    bags = run.bags
    if strength and bags is not None:
        X = bag_jitter(X, bags[rows], strength, run.config.fold_seed(fold) + 1000)
    return X


def run_unit(run_dir: str, name: str, fold: int) -> dict:
    """Fit candidate ``name`` on every fold but ``fold``, predict ``fold``; write the result."""
    run = _loaded(run_dir)
    cfg = run.config
    seed = cfg.fold_seed(fold)
    entry = seeded_entry(cfg.candidates[name].spec(), seed)
    train, test = training_rows(run, entry, fold, seed), run.folds.test(fold)
    X_train, y_train = training_images(run, train, fold), run.labels[train]
    classes = np.arange(len(run.classes))
    with run.staged_unit(name, fold) as tmp:
        t0 = time.perf_counter()
        best, tuning = tune_unit(run, name, fold)
        if best:
            entry = {**entry, "params": {**entry["params"], **best}}
        t1 = time.perf_counter()
        cand = build_candidate(entry)
        fit_candidate(cand, X_train, y_train, classes=classes, workdir=tmp)
        t2 = time.perf_counter()
        X_test = np.asarray(run.images[test])
        proba = predict_proba_for(cand, X_test, classes)
        t3 = time.perf_counter()
        stressed = predict_stressed(cand, X_test, test, stress_shifts(cfg), cfg.run.seed, classes)
        t4 = time.perf_counter()
        cand.save(tmp / "model")
        result = {
            "candidate": name,
            "fold": fold,
            "type": entry["type"],
            "candidate_hash": stable_hash(cfg.candidates[name].spec()),
            "seed": seed,
            "tuning": tuning,
            "tune_seconds": t1 - t0,
            "stress_seconds": t4 - t3,
            **fitted_record(cand, run.labels[test], proba, len(train), t2 - t1, t3 - t2),
        }
        run.write_unit(tmp, result, proba, stressed)
    del cand
    release_memory()
    return result


def fitted_record(
    cand, y_test, proba, n_train: int, fit_seconds: float, predict_seconds: float
) -> dict:
    """The part of a unit's ``result.json`` every fitted and scored model has: its kind,
    parameters, costs, scores on the test rows, when and where it ran."""
    return {
        "kind": cand.kind,
        "params": cand.get_params(deep=False),
        "fit_seconds": fit_seconds,
        "predict_seconds": predict_seconds,
        "predict_ms_per_image": 1000 * predict_seconds / max(1, len(y_test)),
        "n_train": int(n_train),
        "n_test": len(y_test),
        "model_size": cand.model_size(),
        "epochs_run": getattr(cand, "epochs_run_", None),
        "notes": cand.fit_notes(),
        "metrics": fold_metrics(y_test, proba),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "worker": f"{platform.node()}:{os.getpid()}",
    }


def tune_unit(
    run, name: str, fold: int, trials: int | None = None, storage: str | None = None
) -> tuple[dict, dict]:
    """Tune candidate ``name`` on the training rows of ``fold`` (Optuna study ``NAME-foldK``).

    ``run`` (inside the work unit) and ``tune`` (any number of extra processes) both call
    this, so they share one objective and one study per candidate and fold.

    Parameters
    ----------
    run : the prepared run directory (a :class:`RunDir` or its path).
    trials : finished trials the study should hold; default ``[tuning] trials``.
    storage : Optuna storage URL; default ``[tuning] storage`` (SQLite in the run dir).

    Returns
    -------
    ``(best_params, tuning_info)``; ``({}, {})`` when there is nothing to tune.
    """
    run = _loaded(run)
    cfg = run.config
    seed = cfg.fold_seed(fold)
    entry = seeded_entry(cfg.candidates[name].spec(), seed)
    overrides = {
        **({} if trials is None else {"trials": int(trials)}),
        **({"storage": storage} if storage else {}),
    }
    if overrides:  # over [tuning] and over the candidate's own tuning table
        entry = {**entry, "tuning": {**(entry.get("tuning") or {}), **overrides}}
    tuning = cfg.tuning
    if not is_tuned(entry, tuning):
        return {}, {}
    train = training_rows(run, entry, fold, seed)
    return tune_candidate(
        entry,
        training_images(run, train, fold),
        run.labels[train],
        np.arange(len(run.classes)),
        study=f"{name}-fold{fold}",
        tuning=tuning,
        run_dir=str(run.path),
        seed=seed,
    )
