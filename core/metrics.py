"""The metrics of bloodbench: one registry of names, labels, directions and functions.

:data:`REGISTRY` is the one list of metric names: the config schema (``[run] metric``),
the leaderboard, the report, ``evaluate`` and the leakage audit read their names, labels
and directions here. Each :class:`Metric` has a function ``fn(y, proba, sample_weight=None)``
of true class indices ``y`` (N,) and probabilities ``proba`` (N, K); a weight is a count
(weight 2 scores as the row repeated). :func:`fold_metrics` scores one fold with them.

Macro-F1 here averages over **all** K classes (a class never predicted nor present scores
0). ``bench evaluate`` scores an external set over the classes *present* in it instead
(:class:`bench.stats.scoring.WeightedScorer`, ``macro_f1`` averaged over the classes with support).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from core.calibration import ece as _ece


@dataclass(frozen=True)
class Metric:
    """A metric: its key, its label in tables and figures, its direction, its function."""

    name: str
    label: str
    lower_is_better: bool
    fn: Callable  # fn(y, proba, sample_weight=None) -> float
    from_labels: bool  # depends on the predicted classes (the argmax) only

    @property
    def direction(self) -> str:
        return "minimize" if self.lower_is_better else "maximize"


def log_loss(y: np.ndarray, proba: np.ndarray):
    """Mean negative log-probability of the true class (probabilities clipped at 1e-15).

    ``proba`` is (N, K), or a stack (..., N, K) of candidate combinations: then one value
    per combination. The one log loss of bloodbench (metrics, ensembles' weights and
    greedy selection).
    """
    y = np.asarray(y)
    p_true = np.clip(np.asarray(proba)[..., np.arange(len(y)), y], 1e-15, 1.0)
    out = -np.mean(np.log(p_true), axis=-1)
    return float(out) if np.ndim(out) == 0 else out


def _normalised(proba: np.ndarray) -> np.ndarray:
    """Probabilities clipped at 1e-15 and renormalised row by row."""
    p = np.clip(proba, 1e-15, 1.0)
    return p / p.sum(axis=1, keepdims=True)


def accuracy(y, proba, sample_weight=None) -> float:
    return float(accuracy_score(y, np.asarray(proba).argmax(axis=1), sample_weight=sample_weight))


def balanced_accuracy(y, proba, sample_weight=None) -> float:
    """Mean recall over the classes present in ``y``."""
    return float(
        balanced_accuracy_score(y, np.asarray(proba).argmax(axis=1), sample_weight=sample_weight)
    )


def macro_f1(y, proba, sample_weight=None) -> float:
    """F1 averaged over all K classes of ``proba`` (0 for a class neither present nor
    predicted)."""
    proba = np.asarray(proba)
    return float(
        f1_score(
            y,
            proba.argmax(axis=1),
            labels=np.arange(proba.shape[1]),
            average="macro",
            zero_division=0,
            sample_weight=sample_weight,
        )
    )


def roc_auc(y, proba, sample_weight=None) -> float:
    """One-vs-rest ROC AUC averaged over the classes present in ``y`` (the positive
    class's AUC for two classes); NaN with fewer than two classes present."""
    p = _normalised(np.asarray(proba))
    y = np.asarray(y)
    present = np.unique(y if sample_weight is None else y[np.asarray(sample_weight) > 0])
    try:
        if len(present) < 2:
            raise ValueError
        if p.shape[1] == 2:
            return float(roc_auc_score(y, p[:, 1], sample_weight=sample_weight))
        return float(
            np.mean([roc_auc_score(y == c, p[:, c], sample_weight=sample_weight) for c in present])
        )
    except ValueError:
        return float("nan")


def _log_loss(y, proba, sample_weight=None) -> float:
    p = _normalised(np.asarray(proba))
    if sample_weight is None:
        return log_loss(y, p)
    y = np.asarray(y)
    p_true = np.clip(p[np.arange(len(y)), y], 1e-15, 1.0)
    return float(np.average(-np.log(p_true), weights=sample_weight))


def ece(y, proba, sample_weight=None, n_bins: int = 15) -> float:
    """Top-label expected calibration error (:func:`core.calibration.ece`, the one
    implementation)."""
    return _ece(y, proba, n_bins, sample_weight)


REGISTRY: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("accuracy", "accuracy", False, accuracy, True),
        Metric("balanced_accuracy", "balanced accuracy", False, balanced_accuracy, True),
        Metric("macro_f1", "macro-F1", False, macro_f1, True),
        Metric("roc_auc", "ROC AUC (OvR)", False, roc_auc, False),
        Metric("log_loss", "log loss", True, _log_loss, False),
        Metric("ece", "ECE", True, ece, False),
    )
}
#: the metrics scored per fold and on the leaderboard (a run's ``[run] metric``)
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss")
#: every registered metric: the fold metrics and ECE (the report's columns)
REPORT_METRICS = tuple(REGISTRY)
#: the metrics of the predicted classes alone
LABEL_METRICS = tuple(n for n, m in REGISTRY.items() if m.from_labels)
LOWER_IS_BETTER = {n for n, m in REGISTRY.items() if m.lower_is_better}
METRIC_LABELS = {n: m.label for n, m in REGISTRY.items()}
#: a multi-lab run's summaries over its held-out labs (bench.protocols.labs): the worst lab and the mean
LAB_SUMMARIES = ("worst", "mean")
#: the metrics scored per held-out lab, over the classes that lab has (bench.protocols.labs)
LAB_METRICS = LABEL_METRICS
#: ``worst_lab_<m>`` / ``mean_lab_<m>``: leaderboard columns a run can also be ranked by
LAB_RANKINGS = tuple(f"{s}_lab_{m}" for s in LAB_SUMMARIES for m in LAB_METRICS)
#: what ``[run] metric`` may name: a fold metric or a summary over held-out labs
RANKING_METRICS = METRICS + LAB_RANKINGS
METRIC_LABELS |= {
    f"{s}_lab_{m}": f"{s}-lab {METRIC_LABELS[m]}" for s in LAB_SUMMARIES for m in LAB_METRICS
}


def metric_label(name: str) -> str:
    """The label of a registered metric (the name itself for any other column)."""
    return METRIC_LABELS.get(name, name)


def base_metric(metric: str) -> str:
    """The fold metric under a ranking metric: ``worst_lab_balanced_accuracy`` ->
    ``balanced_accuracy`` (what the folds, the stress test and the report's per-fold
    statistics score); any fold metric itself."""
    for s in LAB_SUMMARIES:
        if metric.startswith(f"{s}_lab_"):
            return metric[len(s) + 5 :]
    return metric


def fold_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1, one-vs-rest ROC AUC and log loss."""
    return {m: REGISTRY[m].fn(y, proba) for m in METRICS}


def summarize(per_fold: list[dict[str, float]]) -> dict[str, float]:
    """Mean and standard deviation (ddof=1) of each metric over folds."""
    out = {}
    for m in METRICS:
        vals = np.array([f[m] for f in per_fold], dtype=float)
        out[m] = float(np.nanmean(vals))
        out[f"{m}_std"] = float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else 0.0
    return out


def metric_sort_ascending(metric: str) -> bool:
    return metric in LOWER_IS_BETTER
