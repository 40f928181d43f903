"""Calibration: expected calibration error, reliability curves, temperature scaling.

The expected calibration error (ECE) here is the usual *top-label* ECE: predictions are
binned by their confidence (the largest class probability) into ``n_bins`` equal-width
bins on [0, 1], and ECE is the sample-weighted mean of ``|accuracy - confidence|`` over
the bins.

Temperature scaling (Guo et al., 2017) divides the log-probabilities by one scalar
``T`` before the softmax; ``T`` is chosen to minimise the log loss on held-out rows
(here: out-of-fold probabilities). It never changes the predicted class.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from core.splits import PredefinedFolds

_EPS = 1e-12


def _check(y, proba) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(proba, dtype=float)
    y = np.asarray(y).astype(int)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"proba must be (N, K) with N = len(y); got {p.shape} and {len(y)}")
    return y, p


def bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Each confidence's bin: (0, 1/n], (1/n, 2/n], ...; exactly 0 goes to the first bin."""
    # bins (0, 1/n], (1/n, 2/n], ...; a confidence of exactly 0 goes to the first bin
    return np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)


class BinnedCalibration:
    """The one implementation of top-label calibration in bins: the reliability table and
    the ECE of fixed predictions (their confidence and whether each is correct), under
    per-row weights: none for the set itself, bootstrap counts for a resample (weight 2
    counts as the row repeated).

    Per bin ``b``: ``n_b`` (total weight), mean confidence ``c_b`` and accuracy ``a_b``;
    ``ECE = sum_b n_b |a_b - c_b| / sum_b n_b`` over the non-empty bins. The rows are sorted
    by bin once, so a resample costs one pass per bin over contiguous rows."""

    def __init__(self, conf, correct, n_bins: int = 15):
        conf = np.asarray(conf, dtype=float)
        bins = bin_index(conf, n_bins)
        self.n_bins = int(n_bins)
        self.order = np.argsort(bins, kind="stable")  # rows of a bin keep their order
        self.conf = conf[self.order]
        self.correct = np.asarray(correct, dtype=float)[self.order]
        edges = np.concatenate([[0], np.cumsum(np.bincount(bins, minlength=n_bins))])
        self.slices = [
            (b, slice(int(edges[b]), int(edges[b + 1])))
            for b in range(n_bins)
            if edges[b + 1] > edges[b]
        ]  # the bins with rows

    def totals(self, weight=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(n_b, c_b, a_b)`` of every bin (NaN means in an empty one)."""
        w = (
            np.ones(len(self.conf))
            if weight is None
            else np.asarray(weight, dtype=float)[self.order]
        )
        wc, wa = w * self.conf, w * self.correct
        n = np.zeros(self.n_bins)
        c, a = np.full(self.n_bins, math.nan), np.full(self.n_bins, math.nan)
        for b, s in self.slices:
            n[b] = w[s].sum()
            if n[b] > 0:
                c[b], a[b] = wc[s].sum() / n[b], wa[s].sum() / n[b]
        return n, c, a

    def ece(self, weight=None) -> float:
        n, c, a = self.totals(weight)
        ok = n > 0
        return float(np.sum(n[ok] * np.abs(a[ok] - c[ok])) / np.sum(n)) if ok.any() else math.nan

    @classmethod
    def of(cls, y, proba, n_bins: int = 15) -> "BinnedCalibration":
        """The bins of ``proba``'s top-label confidence and full argmax against ``y``."""
        y, p = _check(y, proba)
        return cls(p.max(axis=1), p.argmax(axis=1) == y, n_bins)


def reliability(y, proba, n_bins: int = 15) -> pd.DataFrame:
    """Reliability table: per confidence bin, ``count``, mean ``confidence`` and ``accuracy``.

    Returns
    -------
    DataFrame with one row per bin (``bin_lo``, ``bin_hi``, ``count``, ``confidence``,
    ``accuracy``, ``gap``); empty bins have NaN confidence and accuracy.
    """
    n, c, a = BinnedCalibration.of(y, proba, n_bins).totals()
    return pd.DataFrame(
        {
            "bin_lo": np.arange(n_bins) / n_bins,
            "bin_hi": np.arange(1, n_bins + 1) / n_bins,
            "count": n.astype(int),
            "confidence": c,
            "accuracy": a,
            "gap": a - c,
        }
    )


def ece(y, proba, n_bins: int = 15, sample_weight=None) -> float:
    """Top-label expected calibration error (see the module docstring and
    :class:`BinnedCalibration`); ``sample_weight``: a count per row. NaN for no rows."""
    y, p = _check(y, proba)
    if len(y) == 0:
        return math.nan
    return BinnedCalibration.of(y, p, n_bins).ece(sample_weight)


def apply_temperature(proba, temperature: float) -> np.ndarray:
    """``softmax(log(proba) / temperature)`` over the classes (the last axis: rows of
    (N, K), or each fold's rows of (F, N, K))."""
    p = np.asarray(proba, dtype=float)
    if temperature <= 0 or not np.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    return softmax(np.log(np.clip(p, _EPS, 1.0)) / float(temperature), axis=-1)


def _nll(y, logp, temperature) -> float:
    z = log_softmax(logp / temperature, axis=1)
    return float(-np.mean(z[np.arange(len(y)), y]))


def fit_temperature(y, proba, bounds=(0.05, 20.0)) -> float:
    """The temperature minimising the log loss of ``apply_temperature(proba, T)`` on ``y``."""
    y, p = _check(y, proba)
    if len(y) == 0:
        raise ValueError("cannot fit a temperature on no rows")
    logp = np.log(np.clip(p, _EPS, 1.0))
    res = minimize_scalar(
        lambda s: _nll(y, logp, math.exp(s)),
        bounds=(math.log(bounds[0]), math.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(math.exp(res.x))


class TemperatureScaler:
    """Temperature scaling as an estimator on probabilities.

    Parameters
    ----------
    bounds : search interval of the temperature.

    Attributes
    ----------
    temperature_ : the fitted temperature.
    """

    def __init__(self, bounds=(0.05, 20.0)):
        self.bounds = bounds

    def fit(self, proba, y) -> "TemperatureScaler":
        self.temperature_ = fit_temperature(y, proba, self.bounds)
        return self

    def transform(self, proba) -> np.ndarray:
        return apply_temperature(proba, self.temperature_)


def cross_fit_temperature(y, proba, folds) -> tuple[np.ndarray, list[float]]:
    """Temperature-scaled probabilities where fold ``k`` uses a ``T`` fitted on the other folds.

    This is the honest estimate of what temperature scaling fitted on out-of-fold data
    does to unseen rows. Returns the scaled probabilities and the temperature per fold.
    """
    y, p = _check(y, proba)
    out = np.empty_like(p)
    temps = []
    for _, train, test in PredefinedFolds(folds):
        t = fit_temperature(y[train], p[train])
        out[test] = apply_temperature(p[test], t)
        temps.append(t)
    return out, temps


__all__ = [
    "ece",
    "reliability",
    "BinnedCalibration",
    "bin_index",
    "apply_temperature",
    "fit_temperature",
    "TemperatureScaler",
    "cross_fit_temperature",
]
