"""Soft voting: a weighted mean of the members' class probabilities."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import softmax

from bench.registry import register
from ensembles.base import Ensemble


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1.0))))


@register("soft_voting")
class SoftVoting(Ensemble):
    """Weighted mean of member probabilities.

    Parameters
    ----------
    weights : ``"equal"``, ``"optimized"`` (minimise log loss on the simplex over the
        rows it is fitted on) or a list of fixed weights.
    """

    def __init__(self, weights="equal"):
        self.weights = weights

    def fit(self, probas, y):
        m = len(probas)
        if isinstance(self.weights, (list, tuple)):
            w = np.asarray(self.weights, dtype=float)
            if len(w) != m or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"need {m} non-negative weights, got {self.weights}")
        elif self.weights == "equal" or m == 1:
            w = np.ones(m)
        elif self.weights == "optimized":
            stack = np.stack(probas)                      # (M, N, K)
            y = np.asarray(y)

            def loss(theta):
                return _log_loss(np.tensordot(softmax(theta), stack, axes=1), y)
            res = minimize(loss, np.zeros(m), method="Nelder-Mead" if m <= 2 else "Powell",
                           options={"xtol": 1e-4, "ftol": 1e-7, "maxiter": 2000})
            w = softmax(res.x)
        else:
            raise ValueError(f"weights must be 'equal', 'optimized' or a list, got {self.weights!r}")
        self.weights_ = (w / w.sum()).tolist()
        return self

    def combine(self, probas):
        return np.tensordot(np.asarray(self.weights_), np.stack(probas), axes=1)

    def get_state(self):
        return {"weights": self.weights_}

    def set_state(self, state):
        self.weights_ = list(state["weights"])
        return self
