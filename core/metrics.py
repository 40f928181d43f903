"""Per-fold metrics and their summaries."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss")
LOWER_IS_BETTER = {"log_loss", "ece"}


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


def fold_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1, one-vs-rest ROC AUC and log loss."""
    n_classes = proba.shape[1]
    labels = np.arange(n_classes)
    pred = proba.argmax(axis=1)
    p = np.clip(proba, 1e-15, 1.0)
    p = p / p.sum(axis=1, keepdims=True)
    out = {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "log_loss": log_loss(y, p),
    }
    present = np.unique(y)
    try:
        if len(present) < 2:
            raise ValueError
        if n_classes == 2:
            out["roc_auc"] = float(roc_auc_score(y, p[:, 1]))
        else:   # average over the classes present in this fold
            out["roc_auc"] = float(np.mean([roc_auc_score(y == c, p[:, c]) for c in present]))
    except ValueError:
        out["roc_auc"] = float("nan")
    return out


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
