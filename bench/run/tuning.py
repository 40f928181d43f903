"""Optuna tuning of one candidate on one outer fold's training rows.

Scheme (no test-fold data ever scores a trial)
-----------------------------------------------
The runner calls :func:`tune_candidate` with **only the outer training rows** of a fold.
Those rows are split once, stratified and seeded, into an inner training part and an
inner validation part (``[tuning] val_fraction``, default 0.2). Each trial fits the
candidate on the inner training part (optionally a stratified subsample of at most
``[tuning] max_samples`` rows, to bound the cost of a trial) and is scored on the inner
validation part with ``[tuning] metric`` (default accuracy). Imputation, scaling and PCA
live inside the candidates' pipelines, so they are fitted on the inner training part only.
The outer test fold is used once, by the runner, to evaluate the candidate refitted with
the best parameters on all outer training rows. The inner split ignores duplicate groups,
so near duplicates can make trial scores optimistic; they never reach the outer fold.

Study
-----
* TPE sampler, seeded per trial from the pair (unit's seed, trial number), so that the
  studies of neighbouring folds (seeds differing by one) do not draw the same points: a
  study is reproducible, a resumed study does not replay the random start-up points of the trials
  it already holds, and several processes adding trials to one study (``bench tune``)
  draw different points;
* the first trial fits the candidate's configured parameters unchanged, so the result is
  never worse, on the inner validation part, than the untuned default (when it wins,
  ``best_params`` is ``{}``: keep the configured parameters);
* stored in ``[tuning] storage`` (:func:`bench.run.storage.make_storage`; default an SQLite file
  in the run directory), named as given (``<candidate>-fold<k>``), loaded if it exists:
  re-running continues with the remaining trials (``trials`` counts finished ones:
  complete, pruned or failed; with several processes on one study, each stops when the
  study holds that many) and the remaining time (``timeout`` minus the finished trials'
  durations);
* pruning (``[tuning] pruner = "median"`` (default), ``"hyperband"`` or ``"none"``) for
  candidates whose ``fit`` accepts ``epoch_callbacks``: each epoch's ``val_accuracy`` is
  reported and a trial the pruner rejects stops with ``optuna.TrialPruned``;
* best parameters and every trial's value go to ``run_dir/tuning/<study>.json``.

Multi-fidelity (cheap trials, full-fidelity refit)
--------------------------------------------------
A trial is cheap by construction when the candidate's tuning table says so:

* ``max_samples``: a stratified subsample of the inner training part;
* ``fidelity``: parameter overrides that hold in trials only, e.g. ``{ epochs = 3 }`` or
  ``{ epochs = 3, input_size = 48 }`` for a CNN, ``{ n_estimators = 100 }`` for XGBoost.
  The default trial runs the configured parameters at that fidelity too, so every trial
  of a study is compared at the same cost. A fidelity key is never searched and never
  part of ``best_params``: the refit on all outer training rows uses the configured value
  (the full fidelity) with the best trial's searched parameters;
* ``min_gain``: a searched trial replaces the configured parameters only when it beats
  them by at least this much on the metric (default 0). Cheap trials score on few
  epochs and rows, so their differences are noisy (accuracy on ~2,300 validation images
  has a standard error of about 0.01); a small margin keeps such noise from choosing
  the refit's settings;
* ``space``: the names of the candidate's ``param_space`` to search (default all), e.g.
  only the optimiser settings of a CNN, so that no trial picks an architecture the budget
  cannot refit; the others keep their configured values;
* the epoch resource: candidates that report epochs are pruned per epoch (``median`` or
  ``hyperband`` successive halving), so a poor trial stops after its first epochs.

Adoption (a tuned setting replaces the configured one only where it will be used)
---------------------------------------------------------------------------------
A cheap trial's ranking need not hold at the refit's fidelity: 4-epoch CNN trials at 32 px
score 0.65-0.83 where the refit reaches 0.96, and settings that won them by 0.03 ended
folds 2-3.5 points below the configured setting. So with ``adopt = "full"`` (default),
when a searched setting wins the cheap trials (by ``min_gain``) and the trials are cheaper
than the refit (a ``fidelity`` table, or ``max_samples`` below the inner training rows),
the challenger and the configured setting are both fitted **as the refit fits them** (full
fidelity, every inner training row, no validation rows handed to the fit) and scored on
the inner validation rows (:func:`full_fidelity_score`). The challenger is kept only when
it scores higher there by more than ``adopt_gain``; otherwise the configured setting
stays. Both scores go to ``info["confirm"]`` (the run card and the leaderboard's
``tuning`` column show them per fold) and to the study (a resumed unit does not refit
them). ``adopt = "trial"`` lets the cheap score decide: for fidelities whose ranking is
shown to agree with full fidelity (:func:`fidelity_check`, ``benchmarks/fidelity.py``:
Spearman of at least 0.6).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import optuna
from scipy.stats import spearmanr
from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit, train_test_split

from core import registry
from core.candidate import build_candidate, fit_candidate, predict_proba_for, release_memory
from core.errors import BenchError
from core.io import atomic_write_json, stable_hash
from core.metrics import LOWER_IS_BETTER, fold_metrics
from core.params import space_names
from core.progress import warn
from bench.config import CandidateTuning, validated
from bench.run.rundir import RunDir
from bench.run.storage import make_storage, optimize_shared, storage_url

optuna.logging.set_verbosity(optuna.logging.WARNING)  # the runner shows progress per unit
FINISHED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.FAIL,
)
# Errors a bad parameter combination may raise: the trial fails, the study goes on.
TRIAL_ERRORS = (ValueError, ArithmeticError, BenchError)
SCHEME = (
    "inner stratified split of the outer fold's training rows: trials fit on the inner "
    "training part and are scored on the inner validation part; the outer test fold "
    "never scores a trial"
)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """The pruner named by ``[tuning] pruner``."""
    name = (name or "median").lower()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    if name in ("none", "nop", "off"):
        return optuna.pruners.NopPruner()
    raise BenchError(f"[tuning] pruner must be 'median', 'hyperband' or 'none', got {name!r}")


def inner_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation) of a seeded split of ``y``, stratified when possible."""
    if not 0 < val_fraction < 1:
        raise BenchError(f"[tuning] val_fraction must be in (0, 1), got {val_fraction!r}")
    y = np.asarray(y)
    _, counts = np.unique(y, return_counts=True)
    n_val = math.ceil(val_fraction * len(y))
    stratify = counts.min() >= 2 and n_val >= len(counts) and len(y) - n_val >= len(counts)
    splitter = (StratifiedShuffleSplit if stratify else ShuffleSplit)(
        n_splits=1, test_size=val_fraction, random_state=seed
    )
    train, val = next(splitter.split(np.zeros(len(y)), y))
    return np.sort(train), np.sort(val)


def _subsample(rows: np.ndarray, y: np.ndarray, max_samples: int, seed: int) -> np.ndarray:
    if not max_samples or len(rows) <= max_samples:
        return rows
    _, counts = np.unique(y[rows], return_counts=True)
    strat = y[rows] if counts.min() >= 2 else None
    try:
        keep, _ = train_test_split(
            rows, train_size=int(max_samples), stratify=strat, random_state=seed
        )
    except ValueError:  # too few rows per class for a stratified sample of that size
        keep, _ = train_test_split(rows, train_size=int(max_samples), random_state=seed)
    return np.sort(keep)


def trial_seed(seed: int, number: int) -> int:
    """A 32-bit seed from (study seed, trial number), distinct for neighbouring pairs."""
    return int(np.random.SeedSequence([int(seed), int(number)]).generate_state(1)[0])


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE whose random state comes from ``(seed, trial.number)`` for each trial (see the
    module docstring).

    TPE keeps no state but its random generator (it re-reads the study's trials every
    time), so a fresh seeded ``TPESampler`` per trial is the same algorithm, made
    reproducible per trial rather than per process.
    """

    def __init__(self, seed: int, **tpe_kwargs):
        self.seed = int(seed)
        self.tpe_kwargs = tpe_kwargs
        self._tpe = optuna.samplers.TPESampler(seed=self.seed, **tpe_kwargs)

    def before_trial(self, study, trial):
        self._tpe = optuna.samplers.TPESampler(
            seed=trial_seed(self.seed, trial.number), **self.tpe_kwargs
        )
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()


def pruning_callback(trial: optuna.Trial, key: str = "val_accuracy"):
    """``callback(epoch, logs)`` reporting ``logs[key]`` to ``trial``; raises ``TrialPruned``."""

    def callback(epoch: int, logs: dict) -> None:
        value = (logs or {}).get(key)
        if value is None:
            return
        trial.report(float(value), int(epoch))
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({key} {float(value):.4f})")

    return callback


class _SpaceTrial:
    """An ``optuna.Trial`` (or ``FixedTrial``) seen through a subset of a candidate's
    ``param_space``: names outside ``searched`` are not sampled (:data:`_NOT_SEARCHED`)."""

    def __init__(self, trial, searched: frozenset):
        self._trial, self._searched = trial, searched

    def _suggest(kind: str):
        def suggest(self, name, *args, **kwargs):
            if name not in self._searched:
                return _NOT_SEARCHED
            return getattr(self._trial, kind)(name, *args, **kwargs)

        return suggest

    suggest_int = _suggest("suggest_int")
    suggest_float = _suggest("suggest_float")
    suggest_categorical = _suggest("suggest_categorical")
    del _suggest

    def __getattr__(self, name):  # number, report, should_prune, user_attrs, ...
        return getattr(self._trial, name)


_NOT_SEARCHED = object()


def searched_names(cls, space=None, fidelity=None) -> list[str]:
    """The names trials search: ``space`` (default all of ``cls.param_space``) less the
    ``fidelity`` keys, which are fixed in trials and keep their configured value in the
    refit."""
    return [
        n for n in (space if space is not None else space_names(cls)) if n not in (fidelity or {})
    ]


def sample_params(cls, trial, searched) -> dict:
    """``cls.param_space(trial)`` restricted to the ``searched`` names."""
    searched = frozenset(searched)
    params = cls.param_space(_SpaceTrial(trial, searched))
    return {k: v for k, v in params.items() if k in searched}


def _scalar_params(params: dict) -> dict:
    return {k: v for k, v in params.items() if v is None or isinstance(v, (bool, int, float, str))}


def _trial_record(t: optuna.trial.FrozenTrial) -> dict:
    dur = t.duration.total_seconds() if t.duration is not None else None
    params = t.params or t.user_attrs.get("configured", {})  # the default trial: as configured
    return {
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "params": params,
        "seconds": dur,
        "default": bool(t.user_attrs.get("default", False)),
        "last_step": t.last_step,
    }


def full_fidelity_score(
    entry: dict, params: dict, X_fit, y_fit, X_val, y_val, classes, metric: str
) -> float:
    """``metric`` on ``X_val`` of ``entry``'s candidate with ``params`` over its configured
    ones, fitted as the refit fits it: the configured fidelity, no validation rows handed to
    ``fit`` (the candidate early-stops on its own split, as in the work unit)."""
    entry = as_spec(entry)
    cand = build_candidate({**entry, "params": {**entry.get("params", {}), **params}})
    try:
        fit_candidate(cand, X_fit, y_fit, classes=classes)
        return float(fold_metrics(y_val, predict_proba_for(cand, X_val, classes))[metric])
    finally:
        del cand
        release_memory()


def _trials_are_cheap(tuning: CandidateTuning, n_fit_rows: int) -> bool:
    return bool(tuning.fidelity) or 0 < tuning.max_samples < n_fit_rows


def _confirm(st, best, entry, cls, searched, data, classes, metric, direction, adopt_gain) -> dict:
    """Challenger ``best`` against the configured setting at full fidelity (module
    docstring, "Adoption"); stored in the study under the trial's number."""
    key = f"confirm-{best.number}"
    if key in st.user_attrs:
        return dict(st.user_attrs[key])
    X_fit, y_fit, X_val, y_val = data
    t0 = time.perf_counter()
    tuned_params = sample_params(cls, optuna.trial.FixedTrial(best.params), searched)
    configured = full_fidelity_score(entry, {}, X_fit, y_fit, X_val, y_val, classes, metric)
    tuned = full_fidelity_score(entry, tuned_params, X_fit, y_fit, X_val, y_val, classes, metric)
    gain = (tuned - configured) * (-1 if direction == "minimize" else 1)
    out = {
        "fidelity": "full",
        "trial": best.number,
        "configured": configured,
        "tuned": tuned,
        "gain": gain,
        "adopt_gain": float(adopt_gain),
        "kept": "tuned" if gain > adopt_gain else "configured",
        "n_fit": int(len(y_fit)),
        "n_val": int(len(y_val)),
        "seconds": time.perf_counter() - t0,
    }
    st.set_user_attr(key, out)
    return out


def fidelity_check(
    entry: dict,
    X_train,
    y_train,
    classes,
    tuning: dict,
    seed: int,
    n_settings: int = 6,
    progress=None,
) -> dict:
    """Does the cheap trial rank settings as the refit would? (``benchmarks/fidelity.py``)

    On one seeded inner split of ``X_train`` (as :func:`tune_candidate` makes it), the
    configured setting and ``n_settings - 1`` settings drawn at random from the searched
    space are each scored twice on the inner validation rows: as a trial (the
    ``fidelity`` overrides, ``max_samples`` rows, the validation rows handed to ``fit`` as
    in a trial) and at full fidelity (:func:`full_fidelity_score`). Returns every
    setting's two scores and their Spearman correlation (``rho``, ``p``). ``progress``:
    ``callback(i, row)`` after each setting.
    """
    tuning = candidate_tuning(tuning, entry)
    entry = as_spec(entry)
    cls = registry.get(entry["type"])
    if not cls.tunable:
        raise BenchError(f"candidate type '{entry['type']}' has no param_space: nothing to tune")
    if n_settings < 3:
        raise BenchError(f"n_settings must be at least 3 for a rank correlation, got {n_settings}")
    searched = searched_names(
        cls, None if tuning.space is None else list(tuning.space), tuning.fidelity
    )
    X_train, y_train = np.asarray(X_train), np.asarray(y_train)
    tr, va = inner_split(y_train, float(tuning.val_fraction), seed)
    cheap = _subsample(tr, y_train, tuning.max_samples, seed)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    configured = {**cls().get_params(deep=False), **entry.get("params", {})}
    settings, seen = [{}], {stable_hash(_scalar_params({k: configured.get(k) for k in searched}))}
    for _ in range(50 * n_settings):  # distinct draws, none the configured setting again
        if len(settings) == n_settings:
            break
        params = sample_params(cls, study.ask(), searched)
        key = stable_hash(_scalar_params({k: params.get(k, configured.get(k)) for k in searched}))
        if key not in seen:
            seen.add(key)
            settings.append(params)
    rows = []
    for i, params in enumerate(settings):
        t0 = time.perf_counter()
        cand = build_candidate(
            {**entry, "params": {**entry.get("params", {}), **params, **tuning.fidelity}}
        )
        try:
            fit_candidate(
                cand, X_train[cheap], y_train[cheap], X_train[va], y_train[va], classes=classes
            )
            trial = float(
                fold_metrics(y_train[va], predict_proba_for(cand, X_train[va], classes))[
                    tuning.metric
                ]
            )
        finally:
            del cand
            release_memory()
        t1 = time.perf_counter()
        full = full_fidelity_score(
            entry,
            params,
            X_train[tr],
            y_train[tr],
            X_train[va],
            y_train[va],
            classes,
            tuning.metric,
        )
        rows.append(
            {
                "setting": i,
                "configured": not params,
                "params": _scalar_params(params),
                "trial_score": trial,
                "full_score": full,
                "trial_seconds": t1 - t0,
                "full_seconds": time.perf_counter() - t1,
            }
        )
        if progress is not None:
            progress(i, rows[-1])
    a = np.array([r["trial_score"] for r in rows])
    b = np.array([r["full_score"] for r in rows])
    rho, p = spearmanr(a, b) if np.ptp(a) > 0 and np.ptp(b) > 0 else (float("nan"),) * 2
    return {
        "candidate_type": entry["type"],
        "metric": tuning.metric,
        "fidelity": dict(tuning.fidelity),
        "max_samples": tuning.max_samples,
        "space": searched,
        "n_trial_rows": int(len(cheap)),
        "n_full_rows": int(len(tr)),
        "n_val": int(len(va)),
        "seed": int(seed),
        "rows": rows,
        "rho": float(rho),
        "p": float(p),
    }


def fold_decision(info: dict | None) -> str:
    """What a fold's refit took, in words: ``""`` (not tuned), ``"configured"`` (no trial
    beat it), ``"tuned (trial score)"`` (adopted on the trials' score), or, after a
    full-fidelity check, which setting was kept with both scores (module docstring)."""
    info = info or {}
    if not info.get("n_trials"):
        return ""
    conf = info.get("confirm")
    if conf:
        kept, other = (
            ("tuned", "configured") if conf["kept"] == "tuned" else ("configured", "tuned")
        )
        return f"{kept} {conf[kept]:.4f} vs {other} {conf[other]:.4f} at full fidelity"
    return "tuned (trial score)" if info.get("best_params") else "configured"


def tuning_column(infos: list[dict | None]) -> str:
    """The leaderboard's ``tuning`` cell: each fold's :func:`fold_decision`, in fold order."""
    parts = [fold_decision(i) for i in infos]
    return "; ".join(f"fold {k}: {d}" for k, d in enumerate(parts) if d)


def as_spec(entry) -> dict:
    """A candidate entry as the dict its candidate is built from (``type``, ``params``, its
    own ``tuning``): the config's typed entry (:class:`bench.config.CandidateSpec`) or such
    a dict given directly."""
    return entry.spec() if hasattr(entry, "spec") else entry


def candidate_tuning(tuning, entry) -> CandidateTuning:
    """``entry``'s tuning settings, typed and every default filled: the ``[tuning]``
    settings (the config's typed section, or a table) with the candidate's own ``tuning``
    table over it."""
    base = tuning.model_dump() if hasattr(tuning, "model_dump") else dict(tuning)
    return validated(
        "config", "[tuning]", CandidateTuning, {**base, **(as_spec(entry).get("tuning") or {})}
    )


def is_tuned(entry, tuning) -> bool:
    """Whether ``entry`` gets trials: its type has a ``param_space`` and its tuning
    settings (:func:`candidate_tuning`) ask for at least one trial."""
    return (
        bool(registry.get(as_spec(entry)["type"]).tunable)
        and candidate_tuning(tuning, entry).trials > 0
    )


def open_storages(cfg, names, run_dir) -> None:
    """Open the Optuna storage of every candidate in ``names`` that is tuned, here, before
    the work units: one process creates a new storage's tables, and a storage that cannot
    be opened is one clear error before any unit runs."""
    urls = {
        candidate_tuning(cfg.tuning, e).storage
        for e in (cfg.candidates[n] for n in names)
        if is_tuned(e, cfg.tuning)
    }
    for url in sorted(urls):
        make_storage(url, run_dir)


def tune_candidate(
    entry: dict, X_train, y_train, classes, study: str, tuning: dict, run_dir, seed: int
) -> tuple[dict, dict]:
    """Tune ``entry``'s candidate on ``X_train, y_train`` (outer training rows only).

    Parameters
    ----------
    entry : resolved candidate entry (``type``, ``params``).
    X_train, y_train : the outer fold's training images and integer labels.
    classes : all class indices (so that every model has every column).
    study : study name, e.g. ``"svm_hog-fold0"``.
    tuning : the ``[tuning]`` table: ``trials``, ``timeout`` (seconds, 0: none), ``storage``,
        ``pruner``, ``val_fraction``, ``max_samples`` (0: all), ``metric``, ``min_gain``,
        ``fidelity`` and ``space`` (module docstring); missing keys take their defaults
        (:class:`bench.config.CandidateTuning`). A candidate's own ``tuning`` table
        (``[candidates.X] tuning = { trials = 0 }``) overrides these keys for it.
    run_dir : run directory (default storage, and ``tuning/<study>.json``).
    seed : seeds the inner split, the subsample and the TPE sampler.

    Returns
    -------
    best_params : parameters of the best trial, as returned by the candidate's
        ``param_space`` (``{}`` when the configured parameters won or no trial completed).
    info : summary for the work unit's ``result.json``.
    """
    run_dir, seed = Path(run_dir), int(seed)
    tuning = candidate_tuning(tuning, entry)  # per-candidate overrides
    entry = as_spec(entry)
    if tuning.trials < 1:
        return {}, {"study": study, "n_trials": 0, "skipped": "trials = 0 for this candidate"}
    cls = registry.get(entry["type"])
    n_trials = tuning.trials
    timeout = float(tuning.timeout)
    metric = tuning.metric
    val_fraction = float(tuning.val_fraction)
    max_samples = tuning.max_samples
    min_gain = float(tuning.min_gain)
    fidelity = dict(tuning.fidelity)
    space = tuning.space
    searched = searched_names(cls, None if space is None else [str(n) for n in space], fidelity)
    t_start = time.perf_counter()

    X_train, y_train = np.asarray(X_train), np.asarray(y_train)
    tr_all, va = inner_split(y_train, val_fraction, seed)
    tr = _subsample(tr_all, y_train, max_samples, seed)
    X_a, y_a, X_b, y_b = X_train[tr], y_train[tr], X_train[va], y_train[va]

    storage = make_storage(tuning.storage, run_dir)
    direction = "minimize" if metric in LOWER_IS_BETTER else "maximize"
    st = _open_study(study, storage, direction, tuning, entry, cls, fidelity, seed)
    ran_now = _run_trials(st, tuning, entry, cls, searched, (X_a, y_a, X_b, y_b), classes)
    trials = [t for t in st.trials if not t.user_attrs.get("surplus")]  # see optimize_shared
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best_params, best_value, best_number = {}, None, None
    kept_configured, confirm = False, None
    if complete:
        best, kept_configured, confirm = _choose_best(
            st,
            complete,
            tuning,
            entry,
            cls,
            searched,
            (X_train[tr_all], y_train[tr_all], X_b, y_b),
            classes,
            direction,
            len(tr_all),
        )
        best_params = (
            {}
            if kept_configured or best.user_attrs.get("default")
            else sample_params(cls, optuna.trial.FixedTrial(best.params), searched)
        )
        best_value, best_number = best.value, best.number
    else:
        warn(f"tuning study '{study}': no trial completed; using the configured parameters")
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in FINISHED}
    info = {
        "study": study,
        "storage": storage_url(tuning.storage, run_dir).split("@")[-1],
        "sampler": "TPE",
        "seed": int(seed),
        "pruner": tuning.pruner,
        "metric": metric,
        "direction": direction,
        "scheme": SCHEME,
        "val_fraction": val_fraction,
        "max_samples": max_samples,
        "fidelity": fidelity,
        "space": searched,
        "n_inner_train": int(len(tr)),
        "n_inner_val": int(len(va)),
        "trials_requested": n_trials,
        "timeout": timeout,
        "trials_run_now": ran_now,
        "n_trials": len(trials),
        **{f"n_{k}": v for k, v in counts.items()},
        "min_gain": min_gain,
        "adopt": tuning.adopt,
        "adopt_gain": float(tuning.adopt_gain),
        "confirm": confirm,
        "kept_configured": kept_configured,
        "best_params": best_params,
        "best_value": best_value,
        "best_trial": best_number,
        "default_value": next((t.value for t in trials if t.user_attrs.get("default")), None),
        "seconds": time.perf_counter() - t_start,
        "trial_seconds": sum(t.duration.total_seconds() for t in trials if t.duration is not None),
        "file": RunDir(run_dir).tuning_file(study).relative_to(run_dir).as_posix(),
    }
    atomic_write_json(
        RunDir(run_dir).tuning_file(study), {**info, "trials": [_trial_record(t) for t in trials]}
    )
    return best_params, info


def _open_study(
    study: str, storage, direction: str, tuning, entry: dict, cls, fidelity: dict, seed: int
) -> optuna.Study:
    """Create the study, or load it when another process (or an earlier attempt) did;
    exactly one creator queues the default trial, which fits the configured parameters."""
    sampler = TrialSeededTPE(seed, n_startup_trials=max(2, min(10, tuning.trials // 2)))
    kw = dict(study_name=study, storage=storage, sampler=sampler, pruner=make_pruner(tuning.pruner))
    try:
        st = optuna.create_study(direction=direction, **kw)
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(**kw)
    configured = _scalar_params(
        {**cls().get_params(deep=False), **entry.get("params", {}), **fidelity}
    )  # what the default trial runs
    st.enqueue_trial({}, user_attrs={"default": True, "configured": configured})
    return st


def _run_trials(st: optuna.Study, tuning, entry: dict, cls, searched, data, classes) -> int:
    """Run the trials still missing (within what is left of ``timeout``); returns how many
    ran in this call."""
    n_trials, timeout = tuning.trials, float(tuning.timeout)
    fidelity = dict(tuning.fidelity)
    X_a, y_a, X_b, y_b = data
    finished = [t for t in st.trials if t.state in FINISHED and not t.user_attrs.get("surplus")]
    remaining = max(0, n_trials - len(finished))
    spent = sum(t.duration.total_seconds() for t in finished if t.duration is not None)
    budget = (timeout - spent) if timeout > 0 else None
    if not remaining or (budget is not None and budget <= 0):
        return 0

    def objective(trial: optuna.Trial) -> float:
        # the first trial fits the configured parameters as they are (they may lie
        # outside the searched ranges); later ones sample the candidate's space
        params = {} if trial.user_attrs.get("default") else sample_params(cls, trial, searched)
        cand = build_candidate(
            {**entry, "params": {**entry.get("params", {}), **params, **fidelity}}
        )
        # candidates that report epochs (fit_accepts "epoch_callbacks") are pruned
        try:
            fit_candidate(
                cand, X_a, y_a, X_b, y_b, classes=classes, epoch_callbacks=[pruning_callback(trial)]
            )
            return fold_metrics(y_b, predict_proba_for(cand, X_b, classes))[tuning.metric]
        finally:  # a trial's model (Keras graph and all) must not outlive it
            del cand
            release_memory()

    # any number of processes (`bench tune`) may add trials: together they stop at
    # exactly n_trials finished ones (bench.run.storage.optimize_shared)
    return optimize_shared(
        st, objective, n_trials, timeout=budget, catch=TRIAL_ERRORS, gc_after_trial=True
    )


def _choose_best(
    st, complete, tuning, entry, cls, searched, refit_data, classes, direction: str, n_train: int
):
    """The best trial, unless it is not clearly better than the configured parameters
    (``min_gain``), or, when trials were cheap and ``adopt = "full"``, it does not also
    win as the refit will fit it. Returns (trial, kept_configured, confirm record)."""
    best = st.best_trial
    default = next((t for t in complete if t.user_attrs.get("default")), None)
    gain = (
        None
        if default is None
        else (best.value - default.value) * (-1 if direction == "minimize" else 1)
    )
    if gain is not None and best is not default and gain < float(tuning.min_gain):
        return default, True, None  # not clearly better than configured
    if best is not default and tuning.adopt == "full" and _trials_are_cheap(tuning, n_train):
        # a cheap win: kept only if it also wins as the refit will fit it
        confirm = _confirm(
            st,
            best,
            entry,
            cls,
            searched,
            refit_data,
            classes,
            tuning.metric,
            direction,
            float(tuning.adopt_gain),
        )
        kept = confirm["kept"] == "configured"
        return (default if kept and default is not None else best), kept, confirm
    return best, False, None
