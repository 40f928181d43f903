"""The run's side of conformal prediction (:mod:`core.conformal`): ``[predictor] conformal``
settings, the conformal entry a saved predictor stores, the leaderboard's risk-coverage
columns, and the figures of ``bench evaluate``.

Every calibration row is an out-of-fold row: its probabilities come from the fold model
that never saw it (the ensembles' out-of-fold rows likewise, see :mod:`ensembles.build`).
"""

from __future__ import annotations

import math

import numpy as np

from bench.config import ConformalSection
from bench.run.leaderboard import fmt
from core.calibration import apply_temperature
from core.conformal import (
    accuracy_at_coverage,
    aurc,
    confidence_scores,
    cross_conformal,
    predictor_entry,
    review_of,
    set_figures,
)
from core.progress import info, warn
from ensembles.record import ConformalRecord, PredictorRecord

#: coverages at which the accuracy of the answered images is reported
COVERAGES = (0.5, 0.8)


def fold_of_row(folds, n: int) -> np.ndarray:
    """Per row, the position of the fold whose model scored it out of fold (the order of
    the saved predictor's fold models)."""
    out = np.full(n, -1, dtype=np.int64)
    for pos, (_, _, test) in enumerate(folds):
        out[test] = pos
    return out


def predictor_extra(
    run, s: ConformalSection, labels, proba, folds, name: str, calibration: dict, combined=None
) -> dict:
    """``{"conformal": ..., "external": ...}`` for the saved entry ``name``: the sets from
    its out-of-fold ``proba``, or with ``s.rows == "combiner"`` from ``combined`` (the
    saved combiner over the members' out-of-fold probabilities), the stored temperature
    applied as the predictor applies it; and its figures on the run's external sets (for
    the model card); ``s`` the run's ``[predictor] conformal`` settings."""
    by_combiner = s.rows == "combiner" and combined is not None
    if by_combiner:
        proba = combined
    t = (calibration.get("calibration") or {}).get("temperature")
    if t:
        proba = apply_temperature(proba, float(t))
    fold = fold_of_row(folds, len(labels))
    entry = predictor_entry(
        proba,
        labels,
        fold,
        cross=s.scheme == "cross" and bool((fold >= 0).all()),
        confidence=s.confidence,
        method=s.method,
        raps_lambda=s.raps_lambda,
        raps_k=s.raps_k,
        target_error=s.target_error,
        shift_limit=s.shift_limit,
        fitted_on=(
            f"the saved combiner of '{name}' over its members' out-of-fold probabilities "
            "(every row)"
            if by_combiner
            else f"out-of-fold probabilities of '{name}' (every row)"
        ),
    )
    return {"conformal": entry, "external": external_summary(run, name, entry, t)}


def external_summary(run, name: str, entry: dict, temperature=None) -> dict:
    """Per external set of the run: the entry's scores with CIs, its classes below 0.5
    recall, and the conformal figures of ``entry`` on the set's stored probabilities."""
    out = {}
    for ext in run.external_sets():
        scores, per_class, meta = run.read_external(ext)
        row = scores[scores["candidate"] == name]
        f = run.external_dir(ext) / "proba" / f"{name}.npy"
        if row.empty or not f.is_file():
            continue
        p = np.load(f).astype(np.float64)
        if temperature:
            p = apply_temperature(p, float(temperature))
        pc = per_class[(per_class["candidate"] == name) & (per_class["support"] > 0)]
        figs = evaluation_figures(
            ConformalRecord.model_validate(entry), p.shape[1], p, meta["labels"], quiet=True
        )
        out[ext] = {
            "n": int(meta.get("n", len(p))),
            **{k: float(row.iloc[0][k]) for k in row.columns if k != "candidate"},
            "low_recall": {
                str(r["class"]): float(r["recall"]) for _, r in pc.iterrows() if r["recall"] < 0.5
            },
            **{
                k: figs[k] for k in ("confidence", "coverage", "mean_set_size", "aurc") if k in figs
            },
            **(
                {
                    "share_flagged": figs["conformal"]["share_flagged"],
                    "answered_accuracy": figs["conformal"]["answered_accuracy"],
                    "below_nominal": figs["conformal"]["below_nominal"],
                }
                if figs
                else {}
            ),
        }
        if out[ext].get("below_nominal"):
            warn(
                f"external set '{ext}': the saved predictor's prediction sets cover "
                f"{out[ext]['coverage']:.3f} of its images, below the nominal "
                f"{entry['confidence']:g}: recalibrate on that lab's labelled images "
                "(bench calibrate) before trusting its sets there"
            )
    return out


def add_leaderboard_columns(
    rows: list[dict], oofs: dict, labels, folds, s: ConformalSection
) -> None:
    """Per entry: cross-conformal coverage and mean set size at ``[predictor] conformal``
    confidence (``s``), and AURC / excess AURC of the maximum softmax (out-of-fold rows)."""
    fold = fold_of_row(folds, len(labels))
    for r in rows:
        p = oofs[r["candidate"]]
        cc = cross_conformal(
            p, labels, fold, s.method, (s.confidence,), raps_lambda=s.raps_lambda, raps_k=s.raps_k
        )
        fig = next(iter(cc.values()))
        r.update(
            {
                "conformal_coverage": fig["coverage"],
                "conformal_set_size": fig["mean_set_size"],
                **aurc(p.max(axis=1), p.argmax(axis=1) == labels),
            }
        )


def evaluation_figures(
    entry: ConformalRecord | None,
    n_classes: int,
    proba,
    y,
    shift=None,
    quiet: bool = False,
    fold_proba=None,
) -> dict:
    """The conformal figures of ``bench evaluate`` (empty without a stored calibration):
    coverage, set size, answered accuracy, share flagged, risk-coverage of each confidence
    score, and a warning when coverage falls below nominal. ``fold_proba``: each fold's
    ensemble's probabilities, for cross-conformal sets (without them, the sets compare
    ``proba`` with the calibration rows directly). ``entry``: a predictor's stored
    calibration (:attr:`PredictorRecord.conformal`)."""
    y = np.asarray(y, dtype=np.int64)
    if entry is None or not len(y):
        return {}
    state = entry.sets(n_classes)
    rv = review_of(state, entry.review, proba, shift, fold_proba)
    fig = set_figures(rv["sets"], y)
    correct = np.asarray(proba).argmax(axis=1) == y
    answered = ~rv["review"]
    scores = {}
    for name, conf in confidence_scores(proba, rv["sets"], shift).items():
        scores[name] = {
            **aurc(conf, correct),
            **{f"accuracy_at_{c:g}": accuracy_at_coverage(conf, correct, c) for c in COVERAGES},
        }
    # the binomial standard error of the coverage on this many images: below nominal by
    # more than two of them is a failed guarantee, not chance
    se = math.sqrt(state.confidence * (1 - state.confidence) / len(y))
    out = {
        "confidence": state.confidence,
        "coverage": fig["coverage"],
        "mean_set_size": fig["mean_set_size"],
        "aurc": scores["max_softmax"]["aurc"],
        "conformal": {
            "method": state.method,
            "n_calibration": int(len(state.cal_labels)),
            "fitted_on": state.fitted_on,
            **fig,
            "per_class_coverage": {
                int(c): float(rv["sets"][y == c, c].mean()) for c in np.unique(y)
            },
            "share_flagged": float(rv["review"].mean()),
            "flagged": {
                k: int(rv[k].sum()) for k in ("set_not_one", "low_confidence", "shifted", "review")
            },
            "answered_accuracy": float(correct[answered].mean()) if answered.any() else math.nan,
            "n_answered": int(answered.sum()),
            "confidence_scores": scores,
            "below_nominal": bool(fig["coverage"] < state.confidence - 2 * se),
        },
    }
    if entry.recalibration is not None:  # bench calibrate: the previous calibration
        b = evaluation_figures(
            entry.recalibration.before,
            n_classes,
            proba,
            y,
            shift,
            quiet=True,
            fold_proba=fold_proba,
        )
        out["conformal"]["before_recalibration"] = {
            k: b[k] for k in ("confidence", "coverage", "mean_set_size")
        } | {
            "share_flagged": b["conformal"]["share_flagged"],
            "fitted_on": b["conformal"]["fitted_on"],
        }
    if out["conformal"]["below_nominal"] and not quiet:
        warn(
            f"conformal coverage {fig['coverage']:.3f} is below the nominal "
            f"{state.confidence:g} on this set: its images are not exchangeable with the "
            "calibration rows; recalibrate on labelled images of this lab (bench calibrate)"
        )
    return out


def _leave_out_adaptation_rows(record: PredictorRecord, ext, keep: np.ndarray) -> np.ndarray:
    ad = (record.model_extra or {}).get("adaptation")
    if not ad or str(ext.path.resolve()) != ad.get("data") or not len(keep):
        return keep
    drop = set(ad.get("rows") or [])
    out = np.array([i for i in keep if str(ext.shown[i]) not in drop], dtype=keep.dtype)
    ext.info["adaptation_rows_left_out"] = int(len(keep) - len(out))
    info(f"left out the {len(keep) - len(out)} images bench adapt adapted on (scored: the rest)")
    return out


def leave_out_calibration_rows(record: PredictorRecord, ext, keep: np.ndarray) -> np.ndarray:
    """``keep`` without the images ``bench calibrate`` drew from this same set (and the rest
    of a patient it cut) and those ``bench adapt`` adapted on, counted in ``ext.info``;
    unchanged for other sets."""
    keep = _leave_out_adaptation_rows(record, ext, keep)
    rc = record.conformal.recalibration if record.conformal is not None else None
    if rc is None or str(ext.path.resolve()) != rc.data or not len(keep):
        return keep
    drop = set(rc.rows) | set(rc.excluded_rows)
    out = np.array([i for i in keep if str(ext.shown[i]) not in drop], dtype=keep.dtype)
    ext.info["calibration_rows_left_out"] = int(len(keep) - len(out))
    info(
        f"left out the {len(keep) - len(out)} images bench calibrate drew from this set "
        "(scored: the rest)"
    )
    return out


def summary_lines(r: dict) -> list[str]:
    """``bench evaluate``'s lines on the prediction sets (none without them)."""
    c = r.get("conformal")
    if not c:
        return []
    ms, before = c["confidence_scores"]["max_softmax"], c.get("before_recalibration")
    return [
        f"  prediction sets ({c['method']}, {r['confidence']:g} confidence, calibrated on "
        f"{c['n_calibration']} rows): coverage {fmt(r['coverage'])}"
        + (" BELOW NOMINAL" if c["below_nominal"] else "")
        + f", mean set size {fmt(r['mean_set_size'], 2)}, {c['share_flagged']:.1%} "
        f"flagged for review, accuracy of the answered {fmt(c['answered_accuracy'])} "
        f"({c['n_answered']} images)",
        f"  risk-coverage (maximum softmax): AURC {fmt(r['aurc'], 4)}, excess AURC "
        f"{fmt(ms['excess_aurc'], 4)}; accuracy of the most confident 50 % "
        f"{fmt(ms['accuracy_at_0.5'])}, 80 % {fmt(ms['accuracy_at_0.8'])}",
    ] + (
        [
            f"  before bench calibrate: coverage {fmt(before['coverage'])}, mean set size "
            f"{fmt(before['mean_set_size'], 2)} (calibrated on {before['fitted_on']})"
        ]
        if before
        else []
    )


__all__ = [
    "leave_out_calibration_rows",
    "predictor_extra",
    "external_summary",
    "add_leaderboard_columns",
    "evaluation_figures",
    "summary_lines",
    "fold_of_row",
]
