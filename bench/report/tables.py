"""The numbers behind the report: per-fold metrics, the leaderboard with confidence
intervals, paired comparisons with the saved predictor, per-class scores."""

from __future__ import annotations


import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_curve

from core.calibration import cross_fit_temperature, ece
from core.metrics import REPORT_METRICS, fold_metrics, metric_sort_ascending
from bench.stats.inference import (
    corrected_resampled_ttest,
    fold_size_ratio,
    holm,
    mcnemar,
    t_interval,
)


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
            rows.append(
                {
                    "candidate": name,
                    "fold": k,
                    "n_test": len(test),
                    **metrics_of(run.y[test], p[test], ece_bins),
                }
            )
    return pd.DataFrame(rows)


def leaderboard(run, per_fold: pd.DataFrame, metric: str, confidence: float = 0.95) -> pd.DataFrame:
    """One row per entry: for each metric its mean, std and t-interval; costs; sorted by ``metric``."""
    rows = []
    for name in run.names:
        f = per_fold[per_fold["candidate"] == name]
        row = {
            "candidate": name,
            "kind": run.kind(name),
            "role": run.role(name),
            "members": ";".join(run.members(name)),
        }
        for m in REPORT_METRICS:
            ci = t_interval(f[m].to_numpy(), confidence)
            row.update(
                {m: ci["mean"], f"{m}_std": ci["std"], f"{m}_lo": ci["lo"], f"{m}_hi": ci["hi"]}
            )
        row.update(run.costs[name])  # one definition: the run's leaderboard.csv
        row.update(run.stress[name])  # the stress test's columns, if any
        row["n_folds"] = len(f)
        rows.append(row)
    df = pd.DataFrame(rows)
    df = df.sort_values(
        metric, ascending=lower_is_better(metric), kind="stable", na_position="last"
    ).reset_index(drop=True)
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df


def comparisons(
    run, per_fold: pd.DataFrame, board: pd.DataFrame, metric: str, alpha: float = 0.05
) -> pd.DataFrame:
    """Every entry against the reference: the saved predictor (else the best entry that is
    not a colour-only shortcut; :meth:`RunData.reference`).

    Nadeau-Bengio corrected resampled t-test on the per-fold ``metric`` (test/train
    ratio from the fold sizes) and McNemar on the out-of-fold correctness. Holm's
    adjustment runs over the comparisons of each test; ``significant`` uses the
    adjusted p-values; ``verdict`` says in which direction (``mean_diff`` > 0: the entry
    scores higher than the reference).
    """
    best = run.reference(board["candidate"])
    n_test, n_train = run.fold_sizes()
    ratio = fold_size_ratio(n_test, n_train)
    wide = per_fold.pivot(index="fold", columns="candidate", values=metric)
    correct = {n: run.oof[n].argmax(axis=1) == run.y for n in run.names}
    rows = []
    for name in board["candidate"]:
        if name == best:
            rows.append({"candidate": name, "vs": best, "is_reference": True})
            continue
        t = corrected_resampled_ttest(wide[name].to_numpy(), wide[best].to_numpy(), ratio)
        mc = mcnemar(correct[name], correct[best])
        rows.append(
            {
                "candidate": name,
                "vs": best,
                "is_reference": False,
                "metric": metric,
                "mean_diff": t["mean_diff"],
                "t": t["t"],
                "df": t["df"],
                "p_ttest": t["p"],
                "mcnemar_b": mc["b"],
                "mcnemar_c": mc["c"],
                "mcnemar_statistic": mc["statistic"],
                "mcnemar_method": mc["method"],
                "p_mcnemar": mc["p"],
                "test_train_ratio": ratio,
            }
        )
    df = pd.DataFrame(rows)
    for col in ("p_ttest", "p_mcnemar"):
        if col not in df:
            df[col] = np.nan
        df[col + "_holm"] = holm(df[col].to_numpy(dtype=float))
    df["significant_ttest"] = df["p_ttest_holm"] < alpha
    df["significant_mcnemar"] = df["p_mcnemar_holm"] < alpha
    df["verdict"] = [_verdict(r, lower_is_better(metric)) for _, r in df.iterrows()]
    return df


def _verdict(r, lower: bool = False) -> str:
    """Against the reference (the saved predictor): better or worse by the sign of the
    per-fold difference (``lower``: a lower-is-better metric), when a test says so."""
    if r.get("is_reference"):
        return "predictor"
    t_sig, m_sig = bool(r["significant_ttest"]), bool(r["significant_mcnemar"])
    diff = float(r.get("mean_diff", 0.0) or 0.0)
    side = "better" if (diff < 0 if lower else diff > 0) else "worse"
    if t_sig and m_sig:
        return f"{side} (both tests)"
    if t_sig:
        return f"{side} (t-test)"
    if m_sig:
        return "differs (McNemar)"
    return "not significant"


def per_class(run, name: str) -> pd.DataFrame:
    """Precision, recall, F1 and support per class of one entry's out-of-fold predictions."""
    pred = run.oof[name].argmax(axis=1)
    labels = np.arange(len(run.classes))
    p, r, f, s = precision_recall_fscore_support(run.y, pred, labels=labels, zero_division=0)
    return pd.DataFrame(
        {
            "candidate": name,
            "class": run.classes,
            "precision": p,
            "recall": r,
            "f1": f,
            "support": s,
        }
    )


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
            rows.append(
                {
                    "candidate": name,
                    "true": t,
                    "predicted": p,
                    "count": int(cm[i, j]),
                    "row_fraction": float(norm[i, j]),
                }
            )
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
        rows.append(
            pd.DataFrame(
                {"candidate": name, "class": cls, "fpr": fpr, "tpr": tpr, "threshold": thr}
            )
        )
    return (
        pd.concat(rows, ignore_index=True)
        if rows
        else pd.DataFrame(columns=["candidate", "class", "fpr", "tpr", "threshold"])
    )


def calibration_table(run, per_fold: pd.DataFrame, bins: int) -> pd.DataFrame:
    """ECE per entry: mean over folds, pooled, and after cross-fitted temperature scaling."""
    rows = []
    for name in run.names:
        p = run.oof[name]
        scaled, temps = cross_fit_temperature(run.y, p, run.folds)
        f = per_fold[per_fold["candidate"] == name]
        rows.append(
            {
                "candidate": name,
                "ece_mean_over_folds": float(f["ece"].mean()),
                "ece_pooled": ece(run.y, p, bins),
                "ece_temperature_scaled": ece(run.y, scaled, bins),
                "temperature_median": float(np.median(temps)),
                "mean_confidence": float(p.max(axis=1).mean()),
                "accuracy": float((p.argmax(axis=1) == run.y).mean()),
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- external sets

EXTERNAL_COLUMNS = (
    "leaderboard_rank",
    "candidate",
    "kind",
    "in_domain_balanced_accuracy",
    "in_domain_balanced_accuracy_lo",
    "in_domain_balanced_accuracy_hi",
    "in_domain_accuracy",
    "external_balanced_accuracy",
    "external_balanced_accuracy_lo",
    "external_balanced_accuracy_hi",
    "external_accuracy",
    "external_accuracy_lo",
    "external_accuracy_hi",
    "external_macro_f1",
    "external_ece",
    "external_restricted_balanced_accuracy",
    "gap_balanced_accuracy",
    "in_domain_rank",
    "external_rank",
    "under_shift",
)


def _rank_desc(v: pd.Series) -> pd.Series:
    """1 = highest; ties share the best rank (1, 2, 2, 4); missing values stay missing."""
    return v.rank(ascending=False, method="min").astype("Int64")


def external_table(
    board: pd.DataFrame, scores: pd.DataFrame, stress_col: str | None = None
) -> pd.DataFrame:
    """One row per leaderboard entry (leaderboard order): the in-domain (cross-validated,
    mean over folds) balanced accuracy and accuracy beside the external ones with their
    bootstrap intervals, the gap (external − in-domain balanced accuracy) and both ranks
    by balanced accuracy; ``under_shift``: the board's ``stress_col`` (the run metric under
    simulated shift, ``[stress]``), else empty. Entries without external scores keep empty
    external cells."""
    s = scores.drop_duplicates("candidate").set_index("candidate")
    ext = s.reindex(board["candidate"])

    def col(name):
        return ext[name].to_numpy(dtype=float) if name in ext else np.full(len(board), np.nan)

    df = pd.DataFrame(
        {
            "leaderboard_rank": board["rank"].to_numpy(),
            "candidate": board["candidate"].to_numpy(),
            "kind": board["kind"].to_numpy(),
            "in_domain_balanced_accuracy": board["balanced_accuracy"].to_numpy(dtype=float),
            "in_domain_balanced_accuracy_lo": board["balanced_accuracy_lo"].to_numpy(dtype=float),
            "in_domain_balanced_accuracy_hi": board["balanced_accuracy_hi"].to_numpy(dtype=float),
            "in_domain_accuracy": board["accuracy"].to_numpy(dtype=float),
            "external_balanced_accuracy": col("balanced_accuracy"),
            "external_balanced_accuracy_lo": col("balanced_accuracy_lo"),
            "external_balanced_accuracy_hi": col("balanced_accuracy_hi"),
            "external_accuracy": col("accuracy"),
            "external_accuracy_lo": col("accuracy_lo"),
            "external_accuracy_hi": col("accuracy_hi"),
            "external_macro_f1": col("macro_f1"),
            "external_ece": col("ece"),
            "external_restricted_balanced_accuracy": col("restricted_balanced_accuracy"),
        }
    )
    df["gap_balanced_accuracy"] = (
        df["external_balanced_accuracy"] - df["in_domain_balanced_accuracy"]
    )
    df["in_domain_rank"] = _rank_desc(df["in_domain_balanced_accuracy"])
    df["external_rank"] = _rank_desc(df["external_balanced_accuracy"])
    df["under_shift"] = board[stress_col].to_numpy(dtype=float) if stress_col else np.nan
    return df[list(EXTERNAL_COLUMNS)]


def _spearman(a: np.ndarray, b: np.ndarray, what: str) -> tuple[float, float, str]:
    """``(rho, p, why)``: Spearman's rank correlation, or NaN and why it is undefined."""
    from scipy.stats import spearmanr

    if len(a) < 2:
        return float("nan"), float("nan"), "needs at least two entries with both scores"
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return (
            float("nan"),
            float("nan"),
            (
                "undefined: every entry has the same "
                + (what if np.ptp(a) == 0 else "external")
                + " score"
            ),
        )
    r = spearmanr(a, b)
    return float(r.statistic), float(r.pvalue), ""


def external_agreement(table: pd.DataFrame) -> dict:
    """Does the leaderboard's winner stay the winner on the external set?

    ``rho``/``p``: Spearman rank correlation (:func:`scipy.stats.spearmanr`) between the
    in-domain and the external balanced accuracy over the entries that have both (NaN with
    fewer than two, or when one side is constant); ``rho_shift``/``p_shift``/``n_shift``:
    the same between the score under simulated shift (``under_shift``) and the external
    balanced accuracy (NaN without a stress test); ``best_in_domain``: the leaderboard's
    first entry; ``best_external``: the highest external balanced accuracy (ties: the
    earliest on the leaderboard); ``winner_holds``: the leaderboard's winner is (one of)
    the best on the external set.
    """
    both = table.dropna(subset=["in_domain_balanced_accuracy", "external_balanced_accuracy"])
    rho, p, why = _spearman(
        both["in_domain_balanced_accuracy"].to_numpy(dtype=float),
        both["external_balanced_accuracy"].to_numpy(dtype=float),
        "in-domain",
    )
    shifted = table.reindex(columns=["under_shift", "external_balanced_accuracy"]).dropna()
    rho_s, p_s, _ = _spearman(
        shifted["under_shift"].to_numpy(dtype=float),
        shifted["external_balanced_accuracy"].to_numpy(dtype=float),
        "under-shift",
    )
    best_in = str(table["candidate"].iloc[0]) if len(table) else None
    ext = table["external_balanced_accuracy"]
    best_ext = str(table.loc[ext.idxmax(), "candidate"]) if ext.notna().any() else None
    holds = None
    if best_in is not None and best_ext is not None:
        mine = ext.iloc[0]
        holds = bool(np.isfinite(mine) and mine >= ext.max())
        if holds:
            best_ext = best_in  # tied for first: the leaderboard's winner is a winner
    return {
        "rho": rho,
        "p": p,
        "n": int(len(both)),
        "why": why,
        "rho_shift": rho_s,
        "p_shift": p_s,
        "n_shift": int(len(shifted)),
        "best_in_domain": best_in,
        "best_external": best_ext,
        "winner_holds": holds,
    }


def external_recall(run, per_class_ext: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Per class and entry: out-of-fold (in-domain) recall beside external recall (empty
    for classes the external set lacks) and the external support."""
    rows = []
    for n in names:
        ind = per_class(run, n).set_index("class")
        ext = (
            per_class_ext[per_class_ext["candidate"] == n]
            .drop_duplicates("class")
            .set_index("class")
        )
        for c in run.classes:
            has = c in ext.index
            rows.append(
                {
                    "candidate": n,
                    "class": c,
                    "in_domain_recall": float(ind.loc[c, "recall"]),
                    "in_domain_support": int(ind.loc[c, "support"]),
                    "external_recall": float(ext.loc[c, "recall"]) if has else np.nan,
                    "external_support": int(ext.loc[c, "support"]) if has else 0,
                }
            )
    return pd.DataFrame(rows)
