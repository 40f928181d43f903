"""The stress test of a run: every fold model scored on its test fold under simulated shifts.

``[stress] shifts`` names shifts of :mod:`core.stress` (a lab's stain or colour). Each work
unit scores its fold model on the clean test fold and, beside it, on the same images under
each shift (``units/<name>/fold<k>/stress_<shift>.npy``); a unit finished before a shift
was configured (a resumed run) is scored here from its saved model. The rows are assembled
into out-of-fold probabilities per shift (``oof/stress/<shift>/``) exactly as the clean
ones: every row is scored only by the model that never saw it. Nothing of an external set
is used.
"""

from __future__ import annotations

import numpy as np

from bench.run.rundir import RunDir
from bench.run.context import RunContext, Stage
from core.candidate import load_candidate, predict_proba_for, release_memory
from core.metrics import fold_metrics
from core.progress import unit_progress
from core.stress import simulate


def stress_shifts(cfg) -> list[str]:
    """The simulated shifts a run scores its fold models under (``[stress] shifts``)."""
    return list(cfg.stress.shifts)


def predict_stressed(
    cand, X: np.ndarray, rows: np.ndarray, shifts, seed: int, classes
) -> dict[str, np.ndarray]:
    """``cand``'s probabilities on images ``X`` (the run's rows ``rows``) under each shift
    of ``shifts``."""
    return {s: predict_proba_for(cand, simulate(X, s, rows, seed), classes) for s in shifts}


def complete_stress(run: RunDir, names, shifts, seed: int) -> None:
    """Score, from its saved model, every unit of ``names`` that lacks a shift's rows."""
    missing = {
        (n, k): [s for s in shifts if not run.unit_stress_file(n, k, s).is_file()]
        for n in names
        for k in run.folds.fold_ids
    }
    todo = [unit for unit, lacking in missing.items() if lacking]
    if not todo:
        return
    classes = np.arange(len(run.classes))
    with unit_progress(len(todo), "stress test") as advance:
        for name, k in todo:
            cand = load_candidate(run.unit_model_dir(name, k))
            test = run.folds.test(k)
            for s, p in predict_stressed(
                cand, np.asarray(run.images[test]), test, missing[(name, k)], seed, classes
            ).items():
                run.write_unit_stress(name, k, s, p)
            del cand
            release_memory()
            advance(f"{name} fold {k}")


def collect_stress(run: RunDir, names, shifts) -> dict[str, dict[str, np.ndarray]]:
    """``{shift: {name: out-of-fold probabilities under the shift}}`` (also written to
    ``oof/stress/<shift>/<name>.npy``)."""
    out = {}
    n, k = len(run.labels), len(run.classes)
    for s in shifts:
        out[s] = {}
        for name in names:
            oof = np.zeros((n, k), dtype=np.float64)
            for fold, _, test in run.folds:
                oof[test] = run.unit_stress_proba(name, fold, s)
            run.write_stress_oof(name, s, oof)
            out[s][name] = oof
    return out


def add_stress_columns(
    rows: list[dict], stressed: dict[str, dict[str, np.ndarray]], y: np.ndarray, folds, metric: str
) -> None:
    """Give every leaderboard row ``stress_<shift>_<metric>`` (mean over folds, as the clean
    column) and ``stress_<metric>`` (the mean over shifts)."""
    for row in rows:
        vals = []
        for s, by_name in stressed.items():
            p = by_name[row["candidate"]]
            v = float(np.mean([fold_metrics(y[test], p[test])[metric] for _, _, test in folds]))
            row[f"stress_{s}_{metric}"] = v
            vals.append(v)
        row[f"stress_{metric}"] = float(np.mean(vals))


def _stress_stage(ctx: RunContext) -> None:
    """Units finished before a shift was configured (a resumed run) are scored under it."""
    complete_stress(ctx.run, list(ctx.cfg.candidates), stress_shifts(ctx.cfg), ctx.cfg.run.seed)


#: ``[stress]``: every unit scored under each simulated shift
STAGE = Stage("stress", _stress_stage, lambda ctx: bool(stress_shifts(ctx.cfg)))
