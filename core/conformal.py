"""Conformal prediction sets, review flags and risk-coverage: when not to answer.

The conformal part is `crepes <https://github.com/henrikbostrom/crepes>`_ (Boström):
:class:`crepes.ConformalClassifier` turns calibration non-conformity scores into p-values,
with Mondrian categories. Here only the non-conformity scores are chosen and the fitted
state is kept as JSON (no pickle):

- ``mondrian`` (default): hinge score ``1 - p(class)`` with one Mondrian category per
  class (class-conditional: the coverage holds for each class, rare ones included);
- ``lac``: the same score, one category (marginal coverage; smaller sets);
- ``aps``: adaptive prediction sets (Romano et al. 2020): the probability mass of the
  classes at least as probable as the class, non-randomised (conservative);
- ``raps``: APS plus ``raps_lambda`` per rank beyond ``raps_k`` (Angelopoulos et al. 2021).

A class is in an image's set when its (non-smoothed) p-value is at least
``1 - confidence``; under exchangeability of the calibration rows and the new image the set
holds the true class with probability at least ``confidence`` (per class for ``mondrian``).
Calibration rows must be scored by models that never saw them (out-of-fold probabilities).

Risk-coverage (Geifman et al. 2019, Jaeger et al. 2023): answer the most confident images
first; ``risk(c)`` is the error rate among the answered share ``c``; AURC is its mean over
every coverage, excess AURC the part above the best ranking with the same errors.
"""

from __future__ import annotations

import math

import numpy as np

from core.errors import BenchError

METHODS = ("mondrian", "lac", "aps", "raps")
#: how a bagged predictor's sets meet the out-of-fold rows (:class:`ConformalSets`)
SCHEMES = ("split", "cross")
DIGITS = 6  # calibration scores are stored (and used) rounded to this many decimals
CONFIDENCES = (0.90, 0.95)  # in-lab cross-conformal figures always reported at these
#: ``raps``: the penalty per rank beyond ``RAPS_K`` (Angelopoulos et al. 2021's defaults)
RAPS_LAMBDA, RAPS_K = 0.01, 1
#: the review rule's default shift limit: shift scores lie in 0-1, so only an image beyond
#: every training image is flagged
SHIFT_LIMIT = 1.0


def check_confidence(confidence, what: str = "confidence") -> float:
    """``confidence`` as a float in (0, 1), else one-line :class:`BenchError`."""
    ok = (
        isinstance(confidence, (int, float))
        and not isinstance(confidence, bool)
        and math.isfinite(float(confidence))
        and 0 < float(confidence) < 1
    )
    if not ok:
        raise BenchError(
            f"{what} must be a number strictly between 0 and 1 (e.g. 0.95), got {confidence!r}"
        )
    return float(confidence)


def check_method(method) -> str:
    if method not in METHODS:
        raise BenchError(f"conformal method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def nonconformity(
    proba: np.ndarray, method: str, raps_lambda: float = RAPS_LAMBDA, raps_k: int = RAPS_K
) -> np.ndarray:
    """(N, K) non-conformity score of every class for every image (larger: stranger)."""
    p = np.asarray(proba, dtype=np.float64)
    if method in ("mondrian", "lac"):
        from crepes.extras import hinge

        return np.round(hinge(p), DIGITS)
    # APS: mass of the classes ranked at or above each class (ties share the higher rank)
    order = np.argsort(-p, axis=1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=1)
    cum = np.cumsum(ranked, axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(p.shape[1])[None, :].repeat(len(p), 0), axis=1)
    score = np.take_along_axis(cum, rank, axis=1)
    if method == "raps":
        score = score + raps_lambda * np.maximum(0, rank + 1 - raps_k)
    return np.round(score, DIGITS)


def p_values(cal_scores, cal_labels, scores, mondrian: bool) -> np.ndarray:
    """(N, K) conformal p-values of every class (crepes, non-smoothed)."""
    from crepes import ConformalClassifier

    cal_scores = np.asarray(cal_scores, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if not len(scores):
        return np.zeros(scores.shape)
    if not mondrian:
        cc = ConformalClassifier().fit(cal_scores)
        return cc.predict_p(scores, smoothing=False)
    cc = ConformalClassifier().fit(cal_scores, bins=np.asarray(cal_labels, dtype=np.int64))
    out = np.zeros(scores.shape)
    for c in range(scores.shape[1]):  # class c's score against class c's calibration rows
        out[:, c] = cc.predict_p(scores[:, c], bins=np.full(len(scores), c), smoothing=False)
    return out


def cross_p_values(cal_scores, cal_labels, cal_folds, fold_scores, mondrian: bool) -> np.ndarray:
    """(N, K) cross-conformal p-values (Vovk 2015): fold ``k``'s model scores a new image
    (``fold_scores[k]``, (N, K)) and is compared with the out-of-fold rows it scored
    (``cal_folds == k``), which it never saw; the counts of at least as strange rows are
    summed over the folds, ``p = (sum_k count_k + 1) / (n + 1)`` (per class with
    ``mondrian``). Each count is crepes' non-smoothed p-value on that fold's rows, undone."""
    from crepes import ConformalClassifier

    cal_scores = np.asarray(cal_scores, dtype=np.float64)
    cal_labels = np.asarray(cal_labels, dtype=np.int64)
    cal_folds = np.asarray(cal_folds, dtype=np.int64)
    fold_scores = np.asarray(fold_scores, dtype=np.float64)
    _, n, k_classes = fold_scores.shape
    counts = np.zeros((n, k_classes))
    totals = np.zeros(k_classes)
    if not n:
        return counts
    for k in range(fold_scores.shape[0]):
        groups = (
            [(cal_folds == k) & (cal_labels == c) for c in range(k_classes)]
            if mondrian
            else [cal_folds == k] * k_classes
        )
        for c, m in enumerate(groups):
            if not m.any():
                continue
            p = (
                ConformalClassifier()
                .fit(cal_scores[m])
                .predict_p(fold_scores[k][:, c : c + 1], smoothing=False)[:, 0]
            )
            counts[:, c] += np.rint(p * (m.sum() + 1) - 1)
            totals[c] += m.sum()
    return (counts + 1) / (totals + 1)


class ConformalSets:
    """Fitted conformal prediction sets (see the module docstring); JSON state.

    With ``cal_folds`` (the fold model that scored each calibration row) the sets of a
    bagged predictor are cross-conformal (scheme ``"cross"``): pass each fold's
    probabilities (``fold_proba``, (n_folds, N, K)) and each is compared with its own
    fold's rows, as they were scored, the counts summed over the folds. Without
    ``fold_proba`` (or ``cal_folds``) the sets are split-conformal on ``proba`` (scheme
    ``"split"``, the default: the fold average against every out-of-fold row; measured
    closer to nominal than ``"cross"`` on PBC images no fit saw, whose averaged p-values
    over-cover)."""

    def __init__(
        self,
        method: str,
        confidence: float,
        cal_scores,
        cal_labels,
        n_classes: int,
        raps_lambda: float = RAPS_LAMBDA,
        raps_k: int = RAPS_K,
        fitted_on: str = "",
        cal_folds=None,
    ):
        self.cal_folds = None if cal_folds is None else np.asarray(cal_folds, dtype=np.int64)
        self.method = check_method(method)
        self.confidence = check_confidence(confidence)
        self.cal_scores = np.round(np.asarray(cal_scores, dtype=np.float64), DIGITS)
        self.cal_labels = np.asarray(cal_labels, dtype=np.int64)
        self.n_classes = int(n_classes)
        self.raps_lambda, self.raps_k = float(raps_lambda), int(raps_k)
        self.fitted_on = fitted_on

    @classmethod
    def fit(
        cls,
        proba,
        y,
        method: str = "mondrian",
        confidence: float = 0.95,
        raps_lambda: float = RAPS_LAMBDA,
        raps_k: int = RAPS_K,
        fitted_on: str = "",
        folds=None,
    ) -> "ConformalSets":
        """Calibrate on ``proba`` (N, K) of rows that no model scoring them saw, labels ``y``
        (``folds``: the position of the fold model that scored each row, for
        cross-conformal sets)."""
        proba = np.asarray(proba, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64)
        if proba.ndim != 2 or len(proba) != len(y) or not len(y):
            raise BenchError(
                f"conformal calibration needs (N, K) probabilities and N labels, "
                f"got {proba.shape} and {len(y)}"
            )
        scores = nonconformity(proba, check_method(method), raps_lambda, raps_k)
        return cls(
            method,
            confidence,
            scores[np.arange(len(y)), y],
            y,
            proba.shape[1],
            raps_lambda,
            raps_k,
            fitted_on,
            folds,
        )

    @property
    def mondrian(self) -> bool:
        return self.method == "mondrian"

    @property
    def n_folds(self) -> int | None:
        """How many fold models the cross-conformal sets need (None: split-conformal)."""
        return None if self.cal_folds is None else int(self.cal_folds.max()) + 1

    def p_values(self, proba, fold_proba=None) -> np.ndarray:
        if self.cal_folds is not None and fold_proba is not None:
            fold_proba = np.asarray(fold_proba, dtype=np.float64)
            if fold_proba.ndim != 3 or len(fold_proba) != self.n_folds:
                raise BenchError(
                    f"cross-conformal sets need the probabilities of "
                    f"{self.n_folds} fold models, got {fold_proba.shape}"
                )
            return cross_p_values(
                self.cal_scores,
                self.cal_labels,
                self.cal_folds,
                np.stack(
                    [
                        nonconformity(f, self.method, self.raps_lambda, self.raps_k)
                        for f in fold_proba
                    ]
                ),
                self.mondrian,
            )
        scores = nonconformity(proba, self.method, self.raps_lambda, self.raps_k)
        return p_values(self.cal_scores, self.cal_labels, scores, self.mondrian)

    def sets(self, proba, confidence: float | None = None, fold_proba=None) -> np.ndarray:
        """(N, K) bool: the classes in each image's prediction set (cross-conformal with
        ``fold_proba``, see the class docstring)."""
        c = self.confidence if confidence is None else check_confidence(confidence)
        return self.p_values(proba, fold_proba) >= 1 - c - 1e-12

    def to_dict(self) -> dict:
        counts = np.bincount(self.cal_labels, minlength=self.n_classes)
        return {
            "method": self.method,
            "confidence": self.confidence,
            "library": "crepes.ConformalClassifier (non-smoothed p-values)",
            "class_conditional": self.mondrian,
            "raps_lambda": self.raps_lambda,
            "raps_k": self.raps_k,
            "fitted_on": self.fitted_on,
            "n_calibration": int(len(self.cal_labels)),
            "calibration_counts": counts.astype(int).tolist(),
            "scores": self.cal_scores.tolist(),
            "labels": self.cal_labels.tolist(),
            **(
                {
                    "folds": self.cal_folds.tolist(),
                    "scheme": "cross",
                    "scheme_rule": "each fold's ensemble compared with the out-of-fold rows "
                    "its fold models scored, counts summed over the folds",
                }
                if self.cal_folds is not None
                else {
                    "scheme": "split",
                    "scheme_rule": "the probabilities compared with every calibration row",
                }
            ),
        }

    @classmethod
    def from_dict(cls, d: dict, n_classes: int | None) -> "ConformalSets":
        """The stored state, checked; any defect is one :class:`BenchError` line
        (``n_classes`` None: the labels' upper bound is left to the caller's later check)."""
        if not isinstance(d, dict):
            raise BenchError("'conformal' must be an object")
        scores, labels = d.get("scores"), d.get("labels")
        if not (
            isinstance(scores, list)
            and isinstance(labels, list)
            and scores
            and len(scores) == len(labels)
        ):
            raise BenchError("conformal 'scores' and 'labels' must be lists of the same length")
        try:
            s = np.asarray(scores, dtype=np.float64)
            lab = np.asarray(labels)
        except (TypeError, ValueError):
            raise BenchError("conformal 'scores' must be numbers") from None
        top = int(lab.max()) + 1 if lab.dtype.kind in "iu" and n_classes is None else n_classes
        if (
            s.ndim != 1
            or not np.isfinite(s).all()
            or lab.dtype.kind not in "iu"
            or lab.min() < 0
            or lab.max() >= top
        ):
            raise BenchError(
                f"conformal 'scores' must be finite numbers and 'labels' class "
                f"indices in [0, {n_classes or 'the number of classes'})"
            )
        folds = d.get("folds")
        if folds is not None:
            f = np.asarray(folds) if isinstance(folds, list) else np.zeros(0)
            if (
                f.shape != lab.shape
                or f.dtype.kind not in "iu"
                or f.min() < 0
                or len(np.unique(f)) != f.max() + 1
            ):
                raise BenchError(
                    "conformal 'folds' must give each calibration row's fold "
                    "model, 0 to n_folds - 1, each used"
                )
        return cls(
            d.get("method"),
            d.get("confidence"),
            s,
            lab,
            top,
            d.get("raps_lambda", RAPS_LAMBDA),
            d.get("raps_k", RAPS_K),
            str(d.get("fitted_on", "")),
            folds,
        )


# ----------------------------------------------------------------------------- figures


def set_figures(sets: np.ndarray, y) -> dict:
    """Empirical coverage, mean set size and share of singletons of ``sets`` for labels ``y``."""
    sets = np.asarray(sets, dtype=bool)
    y = np.asarray(y, dtype=np.int64)
    size = sets.sum(axis=1)
    if not len(y):
        return {"coverage": math.nan, "mean_set_size": math.nan, "singleton_share": math.nan}
    return {
        "coverage": float(sets[np.arange(len(y)), y].mean()),
        "mean_set_size": float(size.mean()),
        "singleton_share": float((size == 1).mean()),
        "empty_share": float((size == 0).mean()),
    }


def cross_conformal(
    proba, y, fold_of_row, method: str = "mondrian", confidences=CONFIDENCES, **params
) -> dict:
    """In-lab figures on rows no fit saw: for each fold k, calibrate on the other folds'
    out-of-fold rows and score fold k's rows (each scored by the model of its own fold,
    which never saw it). ``{confidence: {coverage, mean_set_size, ...}}`` over all rows."""
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    fold_of_row = np.asarray(fold_of_row)
    pv = np.zeros(proba.shape)
    for k in np.unique(fold_of_row):
        test = fold_of_row == k
        cal = ConformalSets.fit(proba[~test], y[~test], method, 0.5, **params)
        pv[test] = cal.p_values(proba[test])
    out = {}
    for c in confidences:
        sets = pv >= 1 - check_confidence(c) - 1e-12
        per_class = {int(j): float(sets[y == j, j].mean()) for j in np.unique(y)}
        out[f"{c:g}"] = {**set_figures(sets, y), "per_class_coverage": per_class}
    return out


def risk_coverage(conf, correct) -> tuple[np.ndarray, np.ndarray]:
    """``(coverage, risk)``: answering the ``k`` most confident images, k = 1..N."""
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    order = np.argsort(-conf, kind="stable")
    errors = np.cumsum(~correct[order])
    k = np.arange(1, len(conf) + 1)
    return k / max(len(conf), 1), errors / k


def aurc(conf, correct) -> dict:
    """AURC (mean risk over every coverage) and excess AURC (minus the best ranking's)."""
    correct = np.asarray(correct, dtype=bool)
    if not len(correct):
        return {"aurc": math.nan, "excess_aurc": math.nan}
    _, risk = risk_coverage(conf, correct)
    n, wrong = len(correct), int((~correct).sum())
    k = np.arange(1, n + 1)
    best = np.maximum(0, k - (n - wrong)) / k
    a = float(risk.mean())
    return {"aurc": a, "excess_aurc": a - float(best.mean())}


def accuracy_at_coverage(conf, correct, coverage: float) -> float:
    """Accuracy of the ``coverage`` share of images answered first (most confident)."""
    correct = np.asarray(correct, dtype=bool)
    if not len(correct):
        return math.nan
    n = max(1, int(math.ceil(coverage * len(correct) - 1e-9)))
    order = np.argsort(-np.asarray(conf, dtype=np.float64), kind="stable")
    return float(correct[order[:n]].mean())


def review_threshold(conf, correct, target_error: float) -> float:
    """The lowest confidence ``t`` whose answered images (confidence >= t) err at most
    ``target_error``; above 1 (every image to review) when none does."""
    conf = np.asarray(conf, dtype=np.float64)
    _, risk = risk_coverage(conf, correct)
    ok = np.flatnonzero(risk <= target_error)
    if not len(ok):
        return 1.000001
    return float(np.sort(conf)[::-1][ok.max()])


def confidence_scores(proba, sets=None, shift=None) -> dict[str, np.ndarray]:
    """The confidence scores compared (higher: answer first): maximum softmax, minus the
    set size, minus the shift score, and their combination (set size first, then the shift
    ranking within, then the maximum softmax)."""
    msp = np.asarray(proba, dtype=np.float64).max(axis=1)
    out = {"max_softmax": msp}
    if sets is not None:
        out["set_size"] = -np.asarray(sets).sum(axis=1).astype(np.float64) + 1e-3 * msp
    if shift is not None:
        out["shift_score"] = -np.asarray(shift, dtype=np.float64) + 1e-6 * msp
    if sets is not None and shift is not None:
        out["combined"] = (
            -np.asarray(sets).sum(axis=1) * 4.0 - np.asarray(shift, dtype=np.float64) + msp
        )
    return out


def review_flags(
    sets, proba, shift=None, conf_threshold: float | None = None, shift_limit: float = SHIFT_LIMIT
) -> dict[str, np.ndarray]:
    """Why each image goes to review: its set is not one class, its shift score is at or
    beyond ``shift_limit`` (further out than every training image), or its confidence is
    below ``conf_threshold``. ``review`` is any of them."""
    size = np.asarray(sets).sum(axis=1)
    msp = np.asarray(proba, dtype=np.float64).max(axis=1)
    out = {
        "set_not_one": size != 1,
        "low_confidence": (msp < conf_threshold)
        if conf_threshold is not None
        else np.zeros(len(msp), dtype=bool),
        "shifted": (np.asarray(shift) >= shift_limit)
        if shift is not None
        else np.zeros(len(msp), dtype=bool),
    }
    out["review"] = out["set_not_one"] | out["low_confidence"] | out["shifted"]
    return out


def refer_band(scores, positive, threshold: float, max_rate: float = 1.0) -> dict:
    """The band of patient scores around the threshold where a new patient is referred,
    drawn on out-of-fold patients: at most ``max_rate`` of them inside it (``[patients]
    refer_rate``). Among the bands that run from the threshold to the scores of the
    nearest patients on either side, the one that leaves the fewest misclassified patients
    outside it, then the narrowest; with ``max_rate = 1`` it spans every misclassified
    patient and the threshold."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    wrong = (scores >= threshold) != positive
    below = np.argsort(-np.where(scores < threshold, scores, -np.inf))[
        : int((scores < threshold).sum())
    ]
    above = np.argsort(np.where(scores >= threshold, scores, np.inf))[
        : int((scores >= threshold).sum())
    ]
    cap = int(np.floor(max_rate * len(scores) + 1e-9))
    wb = np.concatenate([[0], np.cumsum(wrong[below])])  # misclassified among the i nearest
    wa = np.concatenate([[0], np.cumsum(wrong[above])])
    best = (int(wrong.sum()), 0, 0, 0)  # (outside, inside, i, j)
    for i in range(min(cap, len(below)) + 1):
        j_max = min(cap - i, len(above))
        j = np.arange(j_max + 1)
        outside = int(wrong.sum()) - wb[i] - wa[j]
        k = int(np.lexsort((i + j, outside))[0])
        cand = (int(outside[k]), int(i + j[k]), i, int(j[k]))
        if cand[:2] < best[:2]:
            best = cand
    _, inside, i, j = best
    return {
        "lo": float(scores[below[i - 1]]) if i else float(threshold),
        "hi": float(scores[above[j - 1]]) if j else float(threshold),
        "n_wrong": int(wrong.sum()),
        "n_wrong_outside": best[0],
        "n_inside": inside,
        "n": int(len(scores)),
        "max_rate": float(max_rate),
        "rule": f"at most {max_rate:.0%} of the out-of-fold patients inside, the fewest "
        "misclassified ones left outside",
    }


def referral_curve(scores, positive, thresholds, bands) -> list[dict]:
    """For each band (``(lo, hi)`` per patient, one pair of arrays per entry of
    ``bands``: ``{max_rate: (lo, hi)}``), the share of patients referred and the accuracy,
    sensitivity and specificity of the patients called (their score outside the band, at
    their ``thresholds``): a risk-referral curve."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    call = s >= np.asarray(thresholds, dtype=np.float64)
    out = []
    for rate, (lo, hi) in bands.items():
        referred = (s >= np.asarray(lo)) & (s <= np.asarray(hi))
        kept = ~referred
        right = call == pos
        out.append(
            {
                "max_rate": float(rate),
                "referred": float(referred.mean()) if len(s) else 0.0,
                "n_called": int(kept.sum()),
                "accuracy_called": float(right[kept].mean()) if kept.any() else float("nan"),
                "sensitivity_called": (
                    float(call[kept & pos].mean()) if (kept & pos).any() else float("nan")
                ),
                "specificity_called": (
                    float((~call)[kept & ~pos].mean()) if (kept & ~pos).any() else float("nan")
                ),
            }
        )
    return out


def predictor_entry(
    proba,
    y,
    fold_of_row,
    *,
    confidence: float = 0.95,
    method: str = "mondrian",
    raps_lambda: float = RAPS_LAMBDA,
    raps_k: int = RAPS_K,
    target_error: float = 0.02,
    shift_limit: float = SHIFT_LIMIT,
    fitted_on: str = "",
    cross: bool = True,
) -> dict:
    """What a saved predictor stores under ``conformal``: the sets calibrated on every
    out-of-fold row (``cross``: with each row's fold, ``fold_of_row`` the position of its
    fold model, for cross-conformal sets), the review rule, and the in-lab figures on rows
    no fit saw (:func:`cross_conformal`) with the risk-coverage of the maximum softmax."""
    y = np.asarray(y, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    params = {"raps_lambda": raps_lambda, "raps_k": raps_k}
    fold_of_row = np.asarray(fold_of_row, dtype=np.int64)
    state = ConformalSets.fit(
        proba,
        y,
        method,
        confidence,
        fitted_on=fitted_on,
        folds=fold_of_row if cross else None,
        **params,
    )
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    levels = tuple(sorted({*CONFIDENCES, float(confidence)}))
    return {
        **state.to_dict(),
        "review": {
            "target_error": float(target_error),
            "confidence_threshold": review_threshold(conf, correct, target_error),
            "shift_limit": float(shift_limit),
            "rule": "set size other than 1, or shift score >= shift_limit, or "
            "maximum probability < confidence_threshold",
        },
        "in_lab": {
            "scheme": "cross-conformal: each fold's out-of-fold rows scored by "
            "sets calibrated on the other folds' out-of-fold rows",
            "n": int(len(y)),
            "by_confidence": cross_conformal(proba, y, fold_of_row, method, levels, **params),
            **aurc(conf, correct),
            "accuracy_at_coverage": {
                f"{c:g}": accuracy_at_coverage(conf, correct, c) for c in (0.5, 0.8, 1.0)
            },
        },
    }


def set_minimum(confidence: float) -> int:
    """The fewest calibration images of a split-conformal set that can leave a class out at
    ``confidence``: from q images the smallest p-value is 1/(q+1), and a class leaves a set
    only when its p-value is below 1 - confidence (fewer images: every set holds every
    class). Pooled (lac, aps, raps) sets need it in all, mondrian sets per class."""
    return int(np.floor(confidence / (1 - confidence) + 1e-9)) + 1


def few_cell_sets(
    proba,
    y,
    method: str,
    confidence: float,
    raps_lambda: float = RAPS_LAMBDA,
    raps_k: int = RAPS_K,
    fitted_on: str = "",
) -> "ConformalSets | None":
    """Split-conformal sets on a few labelled cells of a new lab (``bench adapt --n``, the
    adaptation curve): ``method``, or pooled ``lac`` where a Mondrian method lacks
    :func:`set_minimum` cells of some class; ``None`` when even pooled sets cannot leave
    a class out at ``confidence`` (fewer cells than :func:`set_minimum`)."""
    y = np.asarray(y, dtype=np.int64)
    need = set_minimum(confidence)
    if len(y) < need:
        return None
    k = np.asarray(proba).shape[1]
    if method == "mondrian" and np.bincount(y, minlength=k).min() < need:
        method = "lac"
    return ConformalSets.fit(proba, y, method, confidence, raps_lambda, raps_k, fitted_on)


def review_of(state: ConformalSets, review, proba, shift=None, fold_proba=None) -> dict:
    """Per image: the prediction set (bool (N, K)), its size, and the review flags of the
    stored ``review`` rule (its ``confidence_threshold`` and ``shift_limit``:
    :class:`ensembles.record.Review`); ``fold_proba``: each fold model's probabilities, for
    cross-conformal sets."""
    sets = state.sets(proba, fold_proba=fold_proba)
    flags = review_flags(sets, proba, shift, review.confidence_threshold, float(review.shift_limit))
    return {"sets": sets, "set_size": sets.sum(axis=1), **flags}


def join_set(row: np.ndarray, classes) -> str:
    return "|".join(str(c) for c, keep in zip(classes, row) if keep)


__all__ = [
    "ConformalSets",
    "few_cell_sets",
    "set_minimum",
    "METHODS",
    "SCHEMES",
    "RAPS_LAMBDA",
    "RAPS_K",
    "SHIFT_LIMIT",
    "check_confidence",
    "nonconformity",
    "p_values",
    "cross_p_values",
    "cross_conformal",
    "set_figures",
    "risk_coverage",
    "aurc",
    "accuracy_at_coverage",
    "review_threshold",
    "review_flags",
    "confidence_scores",
    "refer_band",
    "referral_curve",
    "join_set",
    "predictor_entry",
    "review_of",
]
