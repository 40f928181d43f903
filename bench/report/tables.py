"""The numbers behind the report: per-fold metrics, the leaderboard with confidence
intervals, paired comparisons with the best entry, per-class scores."""

from __future__ import annotations


import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_curve

from core.calibration import cross_fit_temperature, ece
from bench.leaderboard import METRIC_LABELS  # noqa: F401  (the report's labels)
from core.metrics import METRICS, fold_metrics, metric_sort_ascending
from bench.stats import corrected_resampled_ttest, fold_size_ratio, holm, mcnemar, t_interval

REPORT_METRICS = tuple(METRICS) + ("ece",)


def lower_is_better(metric: str) -> bool:
    return metric_sort_ascending(metric)


def metrics_of(y, proba, ece_bins: int = 15) -> dict[str, float]:
    """The report's metrics of one set of predictions (one fold)."""
    return {**fold_metrics(np.asarray(y), np.asarray(proba)), "ece": ece(y, proba, ece_bins)}


def per_fold_metrics(run, ece_bins: int = 15) -> pd.DataFrame:
    """Long table: one row per entry and fold with every metric, from out-of-fold probabilities."""
    rows = []
    for name in run.names:
        p = run.oof[name]
        for k, _, test in run.splits:
            rows.append({"candidate": name, "fold": k, "n_test": len(test),
                         **metrics_of(run.y[test], p[test], ece_bins)})
    return pd.DataFrame(rows)


def leaderboard(run, per_fold: pd.DataFrame, metric: str, confidence: float = 0.95) -> pd.DataFrame:
    """One row per entry: for each metric its mean, std and t-interval; costs; sorted by ``metric``."""
    rows = []
    for name in run.names:
        f = per_fold[per_fold["candidate"] == name]
        row = {"candidate": name, "kind": run.kind(name),
               "members": ";".join(run.members(name))}
        for m in REPORT_METRICS:
            ci = t_interval(f[m].to_numpy(), confidence)
            row.update({m: ci["mean"], f"{m}_std": ci["std"], f"{m}_lo": ci["lo"],
                        f"{m}_hi": ci["hi"]})
        row.update(run.costs[name])   # one definition: the run's leaderboard.csv
        row["n_folds"] = len(f)
        rows.append(row)
    df = pd.DataFrame(rows)
    df = df.sort_values(metric, ascending=lower_is_better(metric), kind="stable",
                        na_position="last").reset_index(drop=True)
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df


def comparisons(run, per_fold: pd.DataFrame, board: pd.DataFrame, metric: str,
                alpha: float = 0.05) -> pd.DataFrame:
    """Every entry against the best (first) one on the leaderboard.

    Nadeau-Bengio corrected resampled t-test on the per-fold ``metric`` (test/train
    ratio from the fold sizes) and McNemar on the out-of-fold correctness. Holm's
    adjustment runs over the comparisons of each test; ``significant`` uses the
    adjusted p-values.
    """
    best = board["candidate"].iloc[0]
    n_test, n_train = run.fold_sizes()
    ratio = fold_size_ratio(n_test, n_train)
    wide = per_fold.pivot(index="fold", columns="candidate", values=metric)
    correct = {n: run.oof[n].argmax(axis=1) == run.y for n in run.names}
    rows = []
    for name in board["candidate"]:
        if name == best:
            rows.append({"candidate": name, "vs": best, "is_best": True})
            continue
        t = corrected_resampled_ttest(wide[name].to_numpy(), wide[best].to_numpy(), ratio)
        mc = mcnemar(correct[name], correct[best])
        rows.append({"candidate": name, "vs": best, "is_best": False, "metric": metric,
                     "mean_diff": t["mean_diff"], "t": t["t"], "df": t["df"], "p_ttest": t["p"],
                     "mcnemar_b": mc["b"], "mcnemar_c": mc["c"],
                     "mcnemar_statistic": mc["statistic"], "mcnemar_method": mc["method"],
                     "p_mcnemar": mc["p"], "test_train_ratio": ratio})
    df = pd.DataFrame(rows)
    for col in ("p_ttest", "p_mcnemar"):
        if col not in df:
            df[col] = np.nan
        df[col + "_holm"] = holm(df[col].to_numpy(dtype=float))
    df["significant_ttest"] = df["p_ttest_holm"] < alpha
    df["significant_mcnemar"] = df["p_mcnemar_holm"] < alpha
    df["verdict"] = [_verdict(r) for _, r in df.iterrows()]
    return df


def _verdict(r) -> str:
    """The best entry is first by the metric, so a significant t-test means worse."""
    if r.get("is_best"):
        return "best"
    t_sig, m_sig = bool(r["significant_ttest"]), bool(r["significant_mcnemar"])
    if t_sig and m_sig:
        return "worse (both tests)"
    if t_sig:
        return "worse (t-test)"
    if m_sig:
        return "differs (McNemar)"
    return "not significant"


def per_class(run, name: str) -> pd.DataFrame:
    """Precision, recall, F1 and support per class of one entry's out-of-fold predictions."""
    pred = run.oof[name].argmax(axis=1)
    labels = np.arange(len(run.classes))
    p, r, f, s = precision_recall_fscore_support(run.y, pred, labels=labels, zero_division=0)
    return pd.DataFrame({"candidate": name, "class": run.classes, "precision": p, "recall": r,
                         "f1": f, "support": s})


def confusion(run, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Counts and row-normalised (recall) confusion matrices of the out-of-fold predictions."""
    labels = np.arange(len(run.classes))
    cm = confusion_matrix(run.y, run.oof[name].argmax(axis=1), labels=labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = cm / cm.sum(axis=1, keepdims=True)
    return cm, np.nan_to_num(norm)


def confusion_csv(run, name: str) -> pd.DataFrame:
    cm, norm = confusion(run, name)
    rows = []
    for i, t in enumerate(run.classes):
        for j, p in enumerate(run.classes):
            rows.append({"candidate": name, "true": t, "predicted": p, "count": int(cm[i, j]),
                         "row_fraction": float(norm[i, j])})
    return pd.DataFrame(rows)


def roc_points(run, name: str) -> pd.DataFrame:
    """One-vs-rest ROC curve points of every class present (pooled out-of-fold probabilities)."""
    rows = []
    p = run.oof[name]
    for c, cls in enumerate(run.classes):
        pos = run.y == c
        if pos.all() or not pos.any():
            continue
        fpr, tpr, thr = roc_curve(pos, p[:, c])
        rows.append(pd.DataFrame({"candidate": name, "class": cls, "fpr": fpr, "tpr": tpr,
                                  "threshold": thr}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["candidate", "class", "fpr", "tpr", "threshold"])


def calibration_table(run, per_fold: pd.DataFrame, bins: int) -> pd.DataFrame:
    """ECE per entry: mean over folds, pooled, and after cross-fitted temperature scaling."""
    rows = []
    for name in run.names:
        p = run.oof[name]
        scaled, temps = cross_fit_temperature(run.y, p, run.folds)
        f = per_fold[per_fold["candidate"] == name]
        rows.append({"candidate": name, "ece_mean_over_folds": float(f["ece"].mean()),
                     "ece_pooled": ece(run.y, p, bins),
                     "ece_temperature_scaled": ece(run.y, scaled, bins),
                     "temperature_median": float(np.median(temps)),
                     "mean_confidence": float(p.max(axis=1).mean()),
                     "accuracy": float((p.argmax(axis=1) == run.y).mean())})
    return pd.DataFrame(rows)
