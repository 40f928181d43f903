"""The numbers of ``bench evaluate`` and of a run's external sets: scores of a predictor's
probabilities on a labelled set that holds some of its classes.

Scores are over the classes present in the set, with the predictor's full argmax and with
the argmax restricted to the present classes (:class:`WeightedScorer`); CIs by a seeded
percentile bootstrap over images, or over groups (e.g. patients) when given
(:func:`bootstrap_weights`); the run's own out-of-fold numbers on the same classes beside
them (:func:`in_domain`). The level, resamples, seed and ECE bins are ``[stats]``
(:class:`bench.config.StatsSection`), passed in; :func:`stats_of_run` reads a predictor's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from bench.config import StatsSection
from bench.run.rundir import RunDir
from bench.stats.inference import bootstrap_resamples
from core.calibration import BinnedCalibration, apply_temperature
from core.calibration import ece as ece_score
from core.errors import BenchError
from core.metrics import LABEL_METRICS, log_loss
from ensembles.bags import NO_CALL, REFER
from ensembles.record import PredictorRecord

#: the metrics of an external set (with CIs): those of the predicted classes, and ECE
METRIC_KEYS = LABEL_METRICS + ("ece",)


class WeightedScorer:
    """Accuracy, balanced accuracy, macro-F1 and top-label ECE of fixed predictions from
    per-image weights: ones for the point estimate, bootstrap counts for a resample.

    Balanced accuracy and macro-F1 average over the classes **with support** (weight) in
    the set or resample: an external set holds only some of the predictor's classes, and
    a class drawn no image is left out of that resample's averages. This is not
    :func:`core.metrics.macro_f1`, which averages over all of the predictor's classes.
    ECE: :class:`core.calibration.BinnedCalibration` (the one implementation), ``n_bins``
    bins ([stats] ece_bins)."""

    def __init__(self, y, pred, conf, k: int, n_bins: int = StatsSection().ece_bins):
        self.k = k
        self.cell = np.asarray(y) * k + np.asarray(pred)
        self.calibration = BinnedCalibration(conf, np.asarray(y) == np.asarray(pred), n_bins)

    def __call__(self, w) -> dict[str, float]:
        k = self.k
        cm = np.bincount(self.cell, weights=w, minlength=k * k).reshape(k, k)
        support, predicted, tp = cm.sum(1), cm.sum(0), np.diag(cm)
        rows = support > 0
        total = support.sum()
        f1 = 2 * tp[rows] / (support[rows] + predicted[rows])
        return {
            "accuracy": float(tp.sum() / total),
            "balanced_accuracy": float(np.mean(tp[rows] / support[rows])),
            "macro_f1": float(np.mean(f1)),
            "ece": self.calibration.ece(w),
        }


def bootstrap_weights(
    n: int, groups=None, n_boot: int = StatsSection().n_boot, seed: int = StatsSection().seed
):
    """Yield per-image weights of ``n_boot`` resamples (:func:`bench.stats.inference.bootstrap_resamples`):
    images drawn with replacement, or whole groups drawn with replacement (each image
    weighted by its group's draws)."""
    if groups is None:
        for idx in bootstrap_resamples(n, n_boot, seed):
            yield np.bincount(idx, minlength=n).astype(float)
    else:
        _, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
        g = int(codes.max()) + 1
        for idx in bootstrap_resamples(g, n_boot, seed):
            yield np.bincount(idx, minlength=g)[codes].astype(float)


def _restricted(proba: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Probabilities over the present classes only, renormalised (uniform where all 0)."""
    p = np.clip(proba[:, present], 0.0, None)
    s = p.sum(axis=1, keepdims=True)
    return np.where(s > 0, p / np.where(s > 0, s, 1), 1.0 / len(present))


def _per_class(y, pred, present, classes, k) -> list[dict]:
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    out = []
    for c in present:
        tp, sup, prd = int(cm[c, c]), int(cm[c].sum()), int(cm[:, c].sum())
        prec = tp / prd if prd else 0.0
        rec = tp / sup if sup else math.nan
        out.append(
            {
                "class": classes[c],
                "support": sup,
                "predicted": prd,
                "precision": prec,
                "recall": rec,
                "f1": 2 * tp / (sup + prd) if sup + prd else 0.0,
            }
        )
    return out


def per_external_class(
    ext_labels, y, pred, mapping: dict, classes: list[str], top: int = 3
) -> list[dict] | None:
    """Recall of each of the set's own classes, when the map sends two or more of them onto
    one predictor class (e.g. band and segmented neutrophils onto ``neutrophil``): which
    kinds of cell a predictor class misses. ``None`` for a one-to-one map (the per-class
    table says it all). Each row: ``external_class``, ``mapped_to``, ``n``, ``recall`` (of
    the full argmax), ``wrong``: the ``top`` most frequent wrong answers ``[[class, n]]``."""
    targets = [v for v in mapping.values() if v is not None]
    if len(targets) == len(set(targets)):
        return None
    ext_labels = np.asarray(ext_labels, dtype=object)
    rows = []
    for e in sorted({str(v) for v in ext_labels}):
        sel = ext_labels == e
        truth, got = int(y[sel][0]), pred[sel]
        wrong = pd.Series(got[got != truth]).value_counts()
        rows.append(
            {
                "external_class": e,
                "mapped_to": classes[truth],
                "n": int(sel.sum()),
                "recall": float((got == truth).mean()),
                "wrong": [[classes[int(c)], int(n)] for c, n in wrong.head(top).items()],
            }
        )
    return sorted(rows, key=lambda r: (r["mapped_to"], -r["n"], r["external_class"]))


def score(
    y, proba, classes, groups=None, stats: StatsSection | None = None, n_boot: int | None = None
) -> dict:
    """The numbers of an evaluation (see the module docstring).

    ``y``: indices into ``classes`` (the predictor's); ``proba``: (N, K); ``stats``: the
    ``[stats]`` settings (interval level ``confidence``, ``ece_bins``, ``seed`` and
    ``n_boot``; default: their defaults); ``n_boot``: resamples other than
    ``stats.n_boot`` (the external sets: ``stats.n_boot_external``). Returns the metrics
    over the present classes with the full argmax, ``restricted`` ones with the argmax over
    the present classes, ``per_class``, ``confusion``, ``ci`` (percentile bootstrap; over
    ``groups`` when given) and ``bootstrap`` (what the intervals are: resamples, seed,
    level, ECE bins).
    """
    stats = stats if stats is not None else StatsSection()
    n_boot = int(stats.n_boot if n_boot is None else n_boot)
    seed, level, ece_bins = int(stats.seed), float(stats.confidence), int(stats.ece_bins)
    y = np.asarray(y, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    k = len(classes)
    present = np.unique(y)
    pred = proba.argmax(axis=1)
    pr = _restricted(proba, present)
    pred_r = present[pr.argmax(axis=1)]
    y_r = np.searchsorted(present, y)
    full = WeightedScorer(y, pred, proba.max(axis=1), k, ece_bins)
    restr = WeightedScorer(y, pred_r, pr.max(axis=1), k, ece_bins)
    ones = np.ones(len(y))
    out = {**full(ones), "log_loss": log_loss(y, np.clip(proba, 1e-15, 1.0))}
    out["restricted"] = {**restr(ones), "log_loss": log_loss(y_r, np.clip(pr, 1e-15, 1.0))}
    boot = {m: [] for m in METRIC_KEYS}
    boot_r = {m: [] for m in METRIC_KEYS}
    for w in bootstrap_weights(len(y), groups, n_boot, seed):
        for store, sc in ((boot, full), (boot_r, restr)):
            for m, v in sc(w).items():
                store[m].append(v)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]

    def ci(store):
        return {
            m: dict(zip(("lo", "hi"), map(float, np.nanpercentile(v, q))))
            if v
            else {"lo": math.nan, "hi": math.nan}
            for m, v in store.items()
        }

    out["ci"] = {**ci(boot), "restricted": ci(boot_r)}
    n_units = len(set(map(str, groups))) if groups is not None else len(y)
    out["bootstrap"] = {
        "resamples": n_boot,
        "seed": seed,
        "level": level,
        "method": "percentile",
        "unit": "group" if groups is not None else "image",
        "n_units": n_units,
        "ece_bins": ece_bins,
    }
    pc = _per_class(y, pred, present, classes, k)
    pcr = _per_class(y, pred_r, present, classes, k)
    for a, b in zip(pc, pcr):
        a.update({f"{m}_restricted": b[m] for m in ("precision", "recall", "f1")})
    out["per_class"] = pc
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)[present]
    out["confusion"] = {
        "true": [classes[c] for c in present],
        "predicted": list(classes),
        "counts": cm.astype(int).tolist(),
    }
    out["present_classes"] = [classes[c] for c in present]
    out["absent_classes"] = [c for i, c in enumerate(classes) if i not in set(present)]
    out["_pred"], out["_pred_r"] = pred, pred_r
    return out


# ----------------------------------------------------------------------------- in-domain


def verdict(
    ba: float,
    lo: float,
    hi: float,
    n: int,
    stats: StatsSection,
    *,
    in_lab: float | None = None,
    review_share: float | None = None,
    what: str = "images",
) -> dict:
    """A plain-words verdict on one set: ``usable``, ``not usable`` or ``not shown`` (the
    interval straddles the bar), from the balanced accuracy ``ba`` [``lo``, ``hi``] on ``n``
    ``what`` and the share that would go to review, against ``[stats]
    usable_balanced_accuracy`` and ``usable_review_share``. Returns ``{"verdict", "line"}``."""
    bar, most = float(stats.usable_balanced_accuracy), float(stats.usable_review_share)
    too_many = review_share is not None and review_share > most
    if hi < bar or too_many:
        word, head = "not usable", "not usable on this set"
    elif lo >= bar:
        word, head = "usable", "usable on this set"
    else:
        word, head = "not shown", "not shown usable on this set (the interval straddles the bar)"
    line = f"{head}: balanced accuracy {ba:.2f} [{lo:.2f}, {hi:.2f}] on {n} {what}"
    if in_lab is not None:
        line += f" against {in_lab:.2f} in its own lab"
    if review_share is not None:
        line += f"; {review_share:.0%} would go to review"
    line += (
        f" (bar: [stats] usable_balanced_accuracy {bar:g}"
        + (f", usable_review_share {most:g}" if review_share is not None else "")
        + ")"
    )
    return {"verdict": word, "line": line}


def verdict_of_score(sc: dict, n: int, stats: StatsSection, **kw) -> dict:
    """:func:`verdict` of a :func:`score` result (or an evaluation holding its keys): its
    balanced accuracy and that figure's interval."""
    ci = sc["ci"]["balanced_accuracy"]
    return verdict(sc["balanced_accuracy"], ci["lo"], ci["hi"], n, stats, **kw)


def stats_of_run(predictor_dir: Path) -> tuple[StatsSection, str]:
    """The ``[stats]`` of the run a saved predictor was made by (its ``config.toml``, when
    the predictor sits in its run directory ``DIR/predictor``), else the defaults; and
    where they came from."""
    run = RunDir(Path(predictor_dir).resolve().parent)
    try:
        if run.is_run():
            return run.config.stats, f"[stats] of {run.path / run.CONFIG}"
    except (BenchError, OSError, ValueError) as exc:
        return StatsSection(), f"[stats] defaults ({run.path / run.CONFIG} unreadable: {exc})"
    return StatsSection(), "[stats] defaults (the predictor is not inside its run directory)"


def in_domain(
    predictor_dir: Path,
    record: PredictorRecord,
    present: list[str],
    ece_bins: int = StatsSection().ece_bins,
):
    """The run's out-of-fold numbers of the saved entry (``DIR/predictor`` ->
    ``RunDir(DIR)``); ``(None, why)`` when they are not available."""
    run = RunDir(Path(predictor_dir).resolve().parent)
    entry = record.ensemble.name
    if not run.is_run():
        return None, (
            f"in-domain numbers unavailable: {run.path} is not a run directory "
            "(the predictor was moved out of its run)"
        )
    try:
        proba = run.read_oof(entry)
        y = run.labels
        classes = run.classes
    except (BenchError, OSError, ValueError, KeyError) as exc:
        return None, f"in-domain numbers unavailable: {exc}"
    if list(classes) != list(record.classes) or proba.shape != (len(y), len(classes)):
        return None, (
            f"in-domain numbers unavailable: the run's classes or out-of-fold "
            f"probabilities of '{entry}' do not match the predictor"
        )
    t = record.temperature
    if t:
        proba = apply_temperature(proba, float(t))
    pred = proba.argmax(axis=1)
    k = len(classes)
    recall = {}
    for c in range(k):
        m = y == c
        recall[classes[c]] = float((pred[m] == c).mean()) if m.any() else math.nan
    keep = np.isin(y, [classes.index(c) for c in present])
    sub = WeightedScorer(y[keep], pred[keep], proba[keep].max(axis=1), k, ece_bins)(
        np.ones(int(keep.sum()))
    )
    return {
        "run": str(run.path),
        "entry": entry,
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "ece": ece_score(y, proba, ece_bins),
        "same_classes": {"n": int(keep.sum()), **sub},
        "recall": recall,
        "temperature_applied": float(t) if t else None,
        "_y": y,
        "_proba": proba,
    }, None


__all__ = [
    "WeightedScorer",
    "bootstrap_weights",
    "score",
    "per_external_class",
    "in_domain",
    "stats_of_run",
    "METRIC_KEYS",
]


def _share(hits: list[bool]) -> float:
    return sum(hits) / len(hits) if hits else math.nan


def score_patients(rows: list[dict], positive: str) -> dict:
    """A bag predictor's calls on an external set's patients (``rows`` of
    :func:`ensembles.bags.call_bags`): how many got a call, were referred (too few cells)
    or got none (no readable cell); sensitivity and specificity over the called patients,
    the same at the threshold alone over every patient with a readable cell (referred ones
    included: what the calls would be without referral), and the ROC AUC of the score over
    every patient with a readable cell."""
    called = [r for r in rows if r["decision"] not in (REFER, NO_CALL)]
    pos = [r for r in called if r["label"] == positive]
    neg = [r for r in called if r["label"] != positive]
    scored = [r for r in rows if r["n_cells"]]
    y = [int(r["label"] == positive) for r in scored]
    return {
        "positive": positive,
        "n": len(rows),
        "n_called": len(called),
        "n_refer": sum(r["decision"] == REFER for r in rows),
        "n_none": sum(r["decision"] == NO_CALL for r in rows),
        "sensitivity": (sum(r["decision"] == positive for r in pos) / len(pos))
        if pos
        else math.nan,
        "specificity": (sum(r["decision"] != positive for r in neg) / len(neg))
        if neg
        else math.nan,
        "sensitivity_at_threshold": _share(
            [r["leaning"] == positive for r in scored if r["label"] == positive]
        ),
        "specificity_at_threshold": _share(
            [r["leaning"] != positive for r in scored if r["label"] != positive]
        ),
        "roc_auc": (
            float(roc_auc_score(y, [r["probability"] for r in scored]))
            if 0 < sum(y) < len(y)
            else math.nan
        ),
        "rows": rows,
    }
