"""Stacking: a meta-learner on the members' out-of-fold class probabilities.

The meta-learner sees, for every image, the concatenated class probabilities of all
members (or their logarithms) and predicts the class. Its fitted state is a handful of
numeric arrays (coefficients and intercepts, or class means and variances) stored as
JSON, so a saved predictor never unpickles anything.

Evaluated with :func:`ensembles.base.cross_val_combine`, the meta-learner that scores
fold k is fitted on the other folds' rows only.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from core.registry import register
from ensembles.base import Ensemble


def _logistic(C, seed):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=2000, random_state=seed)


def _lda(C, seed):
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    return LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")


def _gaussian_nb(C, seed):
    from sklearn.naive_bayes import GaussianNB

    return GaussianNB()


# meta-learner name -> (factory(C, seed), fitted attributes needed by predict_proba)
META_LEARNERS = {
    "logistic": (_logistic, ("classes_", "n_features_in_", "coef_", "intercept_")),
    "lda": (_lda, ("classes_", "n_features_in_", "coef_", "intercept_")),
    "gaussian_nb": (_gaussian_nb, ("classes_", "n_features_in_", "theta_", "var_", "class_prior_")),
}
INPUTS = ("log_proba", "proba")
C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
_EPS = 1e-6


def _to_json(value):
    arr = np.asarray(value)
    return {"dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.ravel().tolist()}


def _from_json(obj):
    dtype = np.dtype(obj["dtype"])
    if dtype.kind not in "biuf":
        raise ValueError(f"stacking state: unsupported dtype {obj['dtype']}")
    arr = np.asarray(obj["data"], dtype=dtype).reshape(obj["shape"])
    return arr.item() if arr.ndim == 0 else arr


@register("stacking")
class Stacking(Ensemble):
    """A scikit-learn meta-learner on the members' class probabilities.

    Parameters
    ----------
    meta : ``"logistic"`` (multinomial logistic regression, default), ``"lda"`` (linear
        discriminant analysis with Ledoit-Wolf shrinkage) or ``"gaussian_nb"``.
    C : float or ``"auto"``
        Inverse L2 regularisation strength of the logistic regression (on standardised
        inputs: linear meta-learners are fitted on inputs scaled to unit variance, the
        scaling then folded into their coefficients). ``"auto"`` (default) picks it from
        :data:`C_GRID` by log loss in an inner split of the rows it is fitted on: with
        ``groups`` (the rows' cross-validation folds, as ``cross_val_combine`` and the
        runner pass them) leave one fold out, which mimics meeting a new fold model's
        outputs; without, a seeded stratified ``inner_folds``-fold split.
    inner_folds : int
        Folds of the inner split when no ``groups`` are given.
    inputs : ``"proba"`` (default) or ``"log_proba"`` (log of the probabilities, clipped
        at 1e-6: a logistic meta-learner then generalises a weighted geometric mean, but
        follows overconfident members further; worse on the PBC smoke runs).
    seed : int
        Random state of the meta-learner.
    """

    uses_fold_groups = True  # C = "auto": chosen leaving one training fold out
    param_rules = {
        "meta": {"choices": ["logistic", "lda", "gaussian_nb"]},
        "C": {"type": float, "gt": 0, "also": ["auto"]},
        "inputs": {"choices": ["log_proba", "proba"]},
        "inner_folds": {"ge": 2},
        "seed": {"ge": 0},
    }

    def __init__(self, meta="logistic", C="auto", inputs="proba", inner_folds=5, seed=0):
        self.meta = meta
        self.C = C
        self.inner_folds = inner_folds
        self.inputs = inputs
        self.seed = seed

    def _check(self):
        if self.meta not in META_LEARNERS:
            raise ValueError(
                f"stacking meta must be one of {sorted(META_LEARNERS)}, got {self.meta!r}"
            )
        if self.inputs not in INPUTS:
            raise ValueError(f"stacking inputs must be one of {INPUTS}, got {self.inputs!r}")
        if self.C != "auto" and not (isinstance(self.C, (int, float)) and self.C > 0):
            raise ValueError(f"stacking C must be > 0 or 'auto', got {self.C!r}")

    def _features(self, probas) -> np.ndarray:
        X = np.concatenate([np.asarray(p, dtype=np.float64) for p in probas], axis=1)
        return np.log(np.clip(X, _EPS, 1.0)) if self.inputs == "log_proba" else X

    def fit(self, probas, y, groups=None):
        """Fit the meta-learner on member probabilities ``probas`` and labels ``y``;
        ``groups`` (optional): each row's cross-validation fold, for ``C="auto"``."""
        self._check()
        factory, _ = META_LEARNERS[self.meta]
        self.n_members_ = len(probas)
        self.n_classes_ = int(np.asarray(probas[0]).shape[1])
        y = np.asarray(y, dtype=np.int64)
        if len(np.unique(y)) < 2:
            raise ValueError("stacking needs at least two classes among the rows it is fitted on")
        X = self._features(probas)
        linear = "coef_" in META_LEARNERS[self.meta][1]
        # Tiny problems: one BLAS thread (several only wait on each other on a busy CPU).
        with threadpool_limits(limits=1):
            self.C_ = self._choose_C(X, y, groups)
            meta = factory(self.C_, self.seed)
            if linear:
                # fit on standardised inputs (log-probabilities span ~14 units: lbfgs
                # needs 10x the iterations on them raw), then fold the scaling into the
                # coefficients so the model applies to raw inputs
                mu, sd = X.mean(axis=0), X.std(axis=0)
                sd[sd < 1e-12] = 1.0
                meta.fit((X - mu) / sd, y)
                meta.coef_ = meta.coef_ / sd
                meta.intercept_ = meta.intercept_ - meta.coef_ @ mu
            else:
                meta.fit(X, y)
        self.meta_ = meta
        return self

    def _choose_C(self, X, y, groups=None) -> float:
        if self.C != "auto":
            return float(self.C)
        if self.meta != "logistic":
            return 1.0  # unused by the other meta-learners
        from sklearn.model_selection import LeaveOneGroupOut, StratifiedKFold

        Xs = (X - X.mean(axis=0)) / np.maximum(X.std(axis=0), 1e-12)
        if groups is not None and len(np.unique(groups)) >= 2:
            split = list(LeaveOneGroupOut().split(Xs, y, groups))
        else:
            counts = np.bincount(y)
            k = int(min(self.inner_folds, counts[counts > 0].min()))
            if k < 2:
                return 1.0
            split = list(StratifiedKFold(k, shuffle=True, random_state=self.seed).split(Xs, y))
        split = [(tr, te) for tr, te in split if len(np.unique(y[tr])) >= 2]
        if not split:
            return 1.0
        losses = []
        for C in C_GRID:
            total = 0.0
            for tr, te in split:
                lr = _logistic(C, self.seed).fit(Xs[tr], y[tr])
                p = np.full(len(te), 1e-15)
                known = np.isin(y[te], lr.classes_)
                col = np.searchsorted(lr.classes_, y[te][known])
                p[known] = lr.predict_proba(Xs[te][known])[np.arange(known.sum()), col]
                total -= np.log(np.clip(p, 1e-15, 1.0)).sum()
            losses.append(total / len(y))
        return float(C_GRID[int(np.argmin(losses))])

    def combine(self, probas):
        if len(probas) != self.n_members_:
            raise ValueError(f"fitted for {self.n_members_} members, got {len(probas)}")
        proba = self.meta_.predict_proba(self._features(probas))
        out = np.zeros((len(proba), self.n_classes_), dtype=np.float64)
        out[:, np.asarray(self.meta_.classes_, dtype=np.int64)] = proba  # unseen classes: 0
        return out

    def get_state(self):
        _, attrs = META_LEARNERS[self.meta]
        return {
            "n_members": self.n_members_,
            "n_classes": self.n_classes_,
            "C": self.C_,
            "meta": {a: _to_json(getattr(self.meta_, a)) for a in attrs},
        }

    def set_state(self, state):
        self._check()
        factory, attrs = META_LEARNERS[self.meta]
        missing = [a for a in attrs if a not in state.get("meta", {})]
        if missing:
            raise ValueError(f"stacking state lacks {missing}")
        self.C_ = float(state.get("C", 1.0))
        meta = factory(self.C_, self.seed)
        for a in attrs:
            setattr(meta, a, _from_json(state["meta"][a]))
        self.meta_ = meta
        self.n_members_ = int(state["n_members"])
        self.n_classes_ = int(state["n_classes"])
        return self
