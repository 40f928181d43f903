"""Greedy forward selection of ensemble members (Caruana et al., ICML 2004).

Starting from the best single member, each round adds (with replacement) the member
whose inclusion gives the best score of the averaged probabilities; the returned
weights are the selection counts of the best ensemble met along the way, normalised.
Selecting with replacement lets a strong member be chosen several times, which is a
weighting, and makes the procedure far less prone to overfitting than forward
selection without replacement.
"""

from __future__ import annotations

import numpy as np

from core.metrics import log_loss as _log_loss

SELECTION_METRICS = ("log_loss", "accuracy")


def _scores(mean: np.ndarray, y: np.ndarray, metric: str) -> np.ndarray:
    """Scores to **minimise** of candidate ensembles ``mean`` (C, N, K)."""
    log_loss = _log_loss(y, mean)
    if metric == "log_loss":
        return log_loss
    # accuracy, ties broken by log loss (a tiny, bounded share of the score)
    err = np.mean(mean.argmax(axis=2) != y[None, :], axis=1)
    return err + 1e-6 * np.minimum(log_loss, 50.0) / 50.0


def greedy_selection(
    probas: list[np.ndarray], y: np.ndarray, rounds: int = 50, metric: str = "log_loss"
) -> np.ndarray:
    """Caruana-style forward selection with replacement.

    Parameters
    ----------
    probas : list of (N, K) arrays
        One matrix of class probabilities per member, rows aligned with ``y``.
    y : (N,) int array
        Labels (column indices of ``probas``).
    rounds : int
        Number of additions after the first member (the ensemble holds at most
        ``rounds + 1`` picks).
    metric : ``"log_loss"`` or ``"accuracy"``
        What the selection optimises, on the rows given.

    Returns
    -------
    weights : (M,) float array
        Non-negative, summing to 1; members never picked get 0.
    """
    if metric not in SELECTION_METRICS:
        raise ValueError(f"selection metric must be one of {SELECTION_METRICS}, got {metric!r}")
    if int(rounds) < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in probas])  # (M, N, K)
    y = np.asarray(y, dtype=np.int64)
    m = len(stack)
    counts = np.zeros(m, dtype=np.int64)
    total = np.zeros_like(stack[0])
    best_score, best_counts = np.inf, counts
    for r in range(int(rounds) + 1):
        scores = _scores((total[None] + stack) / (r + 1), y, metric)
        j = int(np.argmin(scores))  # ties: the lowest member index
        counts = counts.copy()
        counts[j] += 1
        total += stack[j]
        if scores[j] < best_score - 1e-12:
            best_score, best_counts = float(scores[j]), counts
    return best_counts / best_counts.sum()
