"""A predictor's output recalibrated on a few labelled cells of a new lab, shrunk toward the
original by inner cross-validation.

``p' = softmax(log(p) / T + b)``: one temperature ``T`` and one offset ``b_k`` per class,
fitted by penalised log loss on the N labelled cells (``lam * (|b|^2 + log(T)^2)``: at a large
``lam`` the original output comes back). ``lam`` is chosen by stratified inner
cross-validation on the same N cells from :data:`LAMBDAS`, the largest (about "keep the
original") included, so a lab whose cells say nothing new keeps the original answers. It is
the cheapest thing a lab's hundred labels can adapt: the combiner's output, not the members.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

LAMBDAS = (1e4, 10.0, 1.0, 0.1, 0.01)
_EPS = 1e-12


def apply(proba, temperature: float, bias) -> np.ndarray:
    logp = np.log(np.clip(np.asarray(proba, dtype=np.float64), _EPS, 1.0))
    return softmax(logp / float(temperature) + np.asarray(bias, dtype=np.float64), axis=-1)


def _fit(logp, y, lam: float) -> tuple[float, np.ndarray]:
    k = logp.shape[1]

    def loss(theta):
        t, b = np.exp(theta[0]), theta[1:]
        z = log_softmax(logp / t + b, axis=1)
        return -z[np.arange(len(y)), y].mean() + lam * (theta[0] ** 2 + (b**2).sum())

    res = minimize(loss, np.zeros(k + 1), method="L-BFGS-B")
    return float(np.exp(res.x[0])), res.x[1:]


def fit(proba, y, seed: int = 0, folds: int = 5) -> dict:
    """Fit ``T`` and ``b`` on ``proba`` (N, K) and labels ``y`` (indices); ``lam`` by inner
    stratified cross-validation. Returns ``{"temperature", "bias", "lambda", "inner_log_loss"}``
    (the inner log loss per ``lam``)."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y, dtype=np.int64)
    logp = np.log(np.clip(np.asarray(proba, dtype=np.float64), _EPS, 1.0))
    counts = np.bincount(y)
    k = int(min(folds, counts[counts > 0].min()))
    scores = {}
    if k >= 2:
        split = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(logp, y))
        for lam in LAMBDAS:
            total = 0.0
            for tr, te in split:
                t, b = _fit(logp[tr], y[tr], lam)
                z = log_softmax(logp[te] / t + b, axis=1)
                total -= z[np.arange(len(te)), y[te]].sum()
            scores[lam] = total / len(y)
        lam = min(scores, key=scores.get)
    else:
        lam = LAMBDAS[0]  # too few cells of some class to choose: keep the original
    t, b = _fit(logp, y, lam)
    return {
        "temperature": t,
        "bias": b.tolist(),
        "lambda": lam,
        "inner_log_loss": {str(k_): float(v) for k_, v in scores.items()},
    }


__all__ = ["apply", "fit", "LAMBDAS"]
