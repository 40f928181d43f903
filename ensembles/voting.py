"""Soft voting: a weighted mean of the members' class probabilities."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import softmax

from core.metrics import log_loss
from core.registry import register
from ensembles.base import Ensemble
from ensembles.selection import greedy_selection


@register("soft_voting")
class SoftVoting(Ensemble):
    """Weighted mean of member probabilities.

    Parameters
    ----------
    weights : ``"equal"``, ``"optimized"`` (minimise log loss on the simplex over the
        rows it is fitted on), ``"greedy"`` (Caruana-style forward selection with
        replacement, :func:`ensembles.selection.greedy_selection`, on the rows it is
        fitted on) or a list of fixed weights.
    rounds : int
        Additions of the greedy selection (``weights="greedy"`` only).
    metric : ``"log_loss"`` or ``"accuracy"``
        What the greedy selection optimises (``weights="greedy"`` only).

    Under :func:`ensembles.base.cross_val_combine` the weights of fold k are chosen on
    the other folds' rows only.
    """

    has_member_weights = True
    param_rules = {
        "weights": {"choices": ["equal", "optimized", "greedy"]},
        "rounds": {"ge": 1},
        "metric": {"choices": ["log_loss", "accuracy"]},
    }

    def __init__(self, weights="equal", rounds=50, metric="log_loss"):
        self.weights = weights
        self.rounds = rounds
        self.metric = metric

    def fit(self, probas, y):
        m = len(probas)
        if isinstance(self.weights, (list, tuple)):
            w = np.asarray(self.weights, dtype=float)
            if len(w) != m or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"need {m} non-negative weights, got {self.weights}")
        elif self.weights == "equal" or m == 1:
            w = np.ones(m)
        elif self.weights == "optimized":
            stack = np.stack(probas)  # (M, N, K)
            y = np.asarray(y)

            def loss(theta):
                return log_loss(y, np.tensordot(softmax(theta), stack, axes=1))

            if m <= 2:
                res = minimize(
                    loss,
                    np.zeros(m),
                    method="Nelder-Mead",
                    options={"xatol": 1e-4, "fatol": 1e-7, "maxiter": 2000},
                )
            else:
                res = minimize(
                    loss,
                    np.zeros(m),
                    method="Powell",
                    options={"xtol": 1e-4, "ftol": 1e-7, "maxiter": 2000},
                )
            w = softmax(res.x)
        elif self.weights == "greedy":
            w = greedy_selection(probas, y, rounds=self.rounds, metric=self.metric)
        else:
            raise ValueError(
                f"weights must be 'equal', 'optimized', 'greedy' or a list, got {self.weights!r}"
            )
        self.weights_ = (w / w.sum()).tolist()
        self.n_members_ = m
        return self

    def combine(self, probas):
        if len(probas) != len(self.weights_):
            raise ValueError(f"fitted for {len(self.weights_)} members, got {len(probas)}")
        return np.tensordot(np.asarray(self.weights_), np.stack(probas), axes=1)

    def get_state(self):
        return {"weights": self.weights_}

    def set_state(self, state):
        self.weights_ = [float(w) for w in state["weights"]]
        self.n_members_ = len(self.weights_)
        return self

    def member_weights(self):
        return list(self.weights_)

    def drop_unused(self):
        keep = [i for i, w in enumerate(self.weights_) if w > 0]
        self.weights_ = [self.weights_[i] for i in keep]
        self.n_members_ = len(keep)
        return keep
