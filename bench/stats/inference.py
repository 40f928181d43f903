"""Statistics for comparing candidates over shared cross-validation folds.

* :func:`t_interval`: mean, standard deviation and Student-t confidence interval of
  per-fold scores.
* :func:`corrected_resampled_ttest`: Nadeau and Bengio's corrected resampled t-test for
  two models scored on the same folds (the variance of the mean difference is inflated
  by ``n_test / n_train`` because training sets overlap).
* :func:`mcnemar`: McNemar's test on paired per-image correctness (exact binomial for
  few discordant pairs, else chi-square with continuity correction).
* :func:`holm`: Holm's step-down adjustment of several p-values.
* :func:`bootstrap_resamples`: the one seeded bootstrap (``bench evaluate`` over images or
  groups, the patient leaderboard over bags within each label).
* :func:`friedman` and :func:`nemenyi_cd`: several methods over several data sets
  (Demšar 2006): average ranks, Friedman's chi-square and Iman-Davenport's F, and the
  Nemenyi critical difference of average ranks.

References
----------
Nadeau, C. and Bengio, Y. (2003). Inference for the generalization error. Machine
Learning 52, 239-281.
Demšar, J. (2006). Statistical comparisons of classifiers over multiple data sets.
JMLR 7, 1-30.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st

# Critical values q_alpha of the Nemenyi test for k = 2..10 methods (Demšar 2006, Table 5a:
# studentized range statistic / sqrt(2)).
_NEMENYI_Q = {
    0.05: [1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164],
    0.10: [1.645, 2.052, 2.291, 2.459, 2.589, 2.693, 2.780, 2.855, 2.920],
}


def t_interval(values, confidence: float = 0.95) -> dict:
    """Mean, standard deviation (ddof=1) and a Student-t confidence interval.

    Parameters
    ----------
    values : per-fold scores; NaN values are ignored.
    confidence : coverage of the interval.

    Returns
    -------
    dict with ``mean``, ``std``, ``lo``, ``hi``, ``n``. With fewer than two values the
    interval (and the standard deviation) is NaN.
    """
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    n = len(v)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "std": math.nan, "lo": math.nan, "hi": math.nan, "n": 1}
    std = float(v.std(ddof=1))
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "lo": mean - half, "hi": mean + half, "n": n}


def fold_size_ratio(n_test, n_train) -> float:
    """``mean(n_test) / mean(n_train)`` over folds (the Nadeau-Bengio correction term)."""
    n_test = np.asarray(n_test, dtype=float)
    n_train = np.asarray(n_train, dtype=float)
    if n_test.shape != n_train.shape or len(n_test) == 0 or (n_train <= 0).any():
        raise ValueError("need one positive train size per fold and as many test sizes")
    return float(n_test.mean() / n_train.mean())


def corrected_resampled_ttest(a, b, ratio: float) -> dict:
    """Nadeau-Bengio corrected resampled t-test of ``a`` against ``b`` (paired by fold).

    With ``d_j = a_j - b_j`` over ``k`` folds,
    ``t = mean(d) / sqrt((1/k + ratio) * var(d, ddof=1))`` on ``k - 1`` degrees of freedom,
    where ``ratio = n_test / n_train``.

    Returns
    -------
    dict with ``mean_diff``, ``t``, ``df``, ``p`` (two-sided). With identical differences
    the test is degenerate: ``p`` is 1 when they are all zero, else 0.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("a and b must be 1-D arrays of the same length (one score per fold)")
    keep = ~(np.isnan(a) | np.isnan(b))
    d = a[keep] - b[keep]
    k = len(d)
    if k < 2:
        return {
            "mean_diff": float(d.mean()) if k else math.nan,
            "t": math.nan,
            "df": k - 1,
            "p": math.nan,
        }
    mean = float(d.mean())
    var = float(d.var(ddof=1))
    if var == 0.0 or not np.isfinite(var):
        if mean == 0.0:
            return {"mean_diff": 0.0, "t": 0.0, "df": k - 1, "p": 1.0}
        return {"mean_diff": mean, "t": math.copysign(math.inf, mean), "df": k - 1, "p": 0.0}
    t = mean / math.sqrt((1.0 / k + ratio) * var)
    p = float(2 * _st.t.sf(abs(t), k - 1))
    return {"mean_diff": mean, "t": float(t), "df": k - 1, "p": p}


def mcnemar(correct_a, correct_b, exact_below: int = 25) -> dict:
    """McNemar's test on paired per-sample correctness.

    ``b`` counts samples ``a`` gets right and ``b`` wrong, ``c`` the reverse. With
    ``b + c < exact_below`` the two-sided exact binomial test (p = 0.5) is used, else the
    chi-square statistic ``(|b - c| - 1)^2 / (b + c)`` on one degree of freedom.

    Returns
    -------
    dict with ``b``, ``c``, ``statistic``, ``p``, ``method`` (``"exact"`` or ``"chi2"``).
    """
    ca = np.asarray(correct_a, dtype=bool)
    cb = np.asarray(correct_b, dtype=bool)
    if ca.shape != cb.shape:
        raise ValueError("correct_a and correct_b must have the same shape")
    b = int(np.sum(ca & ~cb))
    c = int(np.sum(~ca & cb))
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "statistic": 0.0, "p": 1.0, "method": "exact"}
    if n < exact_below:
        p = float(_st.binomtest(min(b, c), n, 0.5, alternative="two-sided").pvalue)
        return {"b": b, "c": c, "statistic": float(min(b, c)), "p": min(1.0, p), "method": "exact"}
    stat = (abs(b - c) - 1.0) ** 2 / n
    return {
        "b": b,
        "c": c,
        "statistic": float(stat),
        "p": float(_st.chi2.sf(stat, 1)),
        "method": "chi2",
    }


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN entries are kept and not counted)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    idx = np.where(~np.isnan(p))[0]
    m = len(idx)
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out


def bootstrap_resamples(n: int, n_boot: int, seed: int, strata=None):
    """Yield ``n_boot`` resamples of the units ``0..n-1``, each an index array of ``n``
    drawn with replacement from ``np.random.default_rng(seed)``.

    Without ``strata`` each resample is drawn in turn (lazily: ``n_boot * n`` indices
    never held at once). With ``strata`` (a label per unit) the units of each stratum are
    resampled within it, so every resample keeps the strata's sizes: each stratum is drawn
    for all resamples at once, strata in sorted order, and a resample lists the strata's
    draws in that order.
    """
    rng = np.random.default_rng(seed)
    if strata is None:
        for _ in range(n_boot):
            yield rng.integers(0, n, n)
        return
    strata = np.asarray(strata)
    parts = []
    for s in np.unique(strata):
        units = np.flatnonzero(strata == s)
        parts.append(units[rng.integers(0, len(units), (n_boot, len(units)))])
    yield from np.concatenate(parts, axis=1)


def rank_scores(scores, higher_is_better: bool = True) -> np.ndarray:
    """Ranks (1 = best, ties averaged) of each row of ``scores`` (datasets x methods)."""
    s = np.asarray(scores, dtype=float)
    s = -s if higher_is_better else s
    return np.vstack([_st.rankdata(row) for row in s])


def friedman(scores, higher_is_better: bool = True) -> dict:
    """Friedman test of ``k`` methods over ``N`` data sets (``scores``: N x k).

    Returns
    -------
    dict with ``ranks`` (N x k), ``avg_ranks`` (k), ``chi2`` and ``p`` (Friedman's
    chi-square on k - 1 degrees of freedom), ``F`` and ``p_F`` (Iman-Davenport's F on
    (k - 1, (N - 1)(k - 1)) degrees of freedom), ``n_datasets``, ``n_methods``.
    """
    s = np.asarray(scores, dtype=float)
    if s.ndim != 2 or s.shape[0] < 2 or s.shape[1] < 2:
        raise ValueError("Friedman needs scores for at least 2 data sets x 2 methods")
    if np.isnan(s).any():
        raise ValueError("Friedman needs a score for every data set and method (found NaN)")
    n, k = s.shape
    ranks = rank_scores(s, higher_is_better)
    r = ranks.mean(axis=0)
    chi2 = 12.0 * n / (k * (k + 1)) * (np.sum(r**2) - k * (k + 1) ** 2 / 4.0)
    p = float(_st.chi2.sf(chi2, k - 1))
    denom = n * (k - 1) - chi2
    if denom <= 0:
        f, p_f = math.inf, 0.0
    else:
        f = (n - 1) * chi2 / denom
        p_f = float(_st.f.sf(f, k - 1, (n - 1) * (k - 1)))
    return {
        "ranks": ranks,
        "avg_ranks": r,
        "chi2": float(chi2),
        "p": p,
        "F": float(f),
        "p_F": p_f,
        "n_datasets": n,
        "n_methods": k,
    }


def nemenyi_q(k: int, alpha: float = 0.05) -> float:
    """Critical value ``q_alpha`` of the Nemenyi test for ``k`` methods."""
    if k < 2:
        raise ValueError("need at least 2 methods")
    table = _NEMENYI_Q.get(alpha)
    if table is not None and k - 2 < len(table):
        return table[k - 2]
    # the studentized range with infinite degrees of freedom, divided by sqrt(2)
    return float(_st.studentized_range.ppf(1 - alpha, k, 1e6) / math.sqrt(2))


def nemenyi_cd(k: int, n: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of average ranks: ``q_alpha * sqrt(k (k+1) / (6 N))``."""
    return nemenyi_q(k, alpha) * math.sqrt(k * (k + 1) / (6.0 * n))


__all__ = [
    "t_interval",
    "fold_size_ratio",
    "corrected_resampled_ttest",
    "mcnemar",
    "holm",
    "bootstrap_resamples",
    "rank_scores",
    "friedman",
    "nemenyi_q",
    "nemenyi_cd",
]
