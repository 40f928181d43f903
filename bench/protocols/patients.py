"""Bag (patient-level) tasks: from out-of-fold cell probabilities to a patient leaderboard.

A dataset with ``[data] bags = true`` labels each image with its bag's label (a patient's
diagnosis); the folds hold whole bags, stratified by the bags' labels
(:func:`bench.data.folds.make_bag_folds`). Every candidate and ensemble is trained and scored
on cells as usual; this stage turns their out-of-fold cell probabilities into one score
per bag with each aggregator of ``[patients] aggregators`` (:mod:`ensembles.bags`):

* ``mean``, ``trimmed_mean``, ``top_k_mean`` of the positive class's cell probabilities.
  A bag's cells are all in one fold, so its score comes from the fold models that never
  saw it;
* ``composition``: per outer fold, a cell-type classifier (shrinkage LDA on the
  ``composition_features`` feature set, labels ``[data] cell_types``) is fitted on the
  training bags' cells only, cross-fitted over those bags (inner grouped folds) for their
  own compositions; a bag's composition is the mean of its cells' cell-type
  probabilities, and a logistic regression on the training bags' compositions scores
  the fold's bags.

The decision threshold for a fold's bags is chosen (``[patients] threshold``) on the
other folds' bags only, as the stacking ensembles choose their weights. Nothing from a
test bag enters any fit or threshold used to score it.

Rows a reader needs beside the models' own:

* **shortcut rows**: the rows of colour-only candidates (``[report] colour_extractors``,
  e.g. ``rf_color``) are marked ``shortcut``: a smear's stain and camera can go with its
  diagnosis in a small cohort, and a high colour-only row says the other rows may be
  reading it too (the report warns within ``[patients] shortcut_margin`` of the best);
* **restricted-cell rows** (``[data] disease_cells``): each cell aggregator over only the
  cells of the types that carry the disease (DeepAPL: blasts and promyelocytes, as the
  study did), so a reader sees whether the signal sits in the cells that should carry it.

Neither kind is ever chosen for the predictor.

**Nested selection.** The predictor carries the row :func:`choose_row` picks (best ROC
AUC, then log loss, among the rows a predictor can apply: a cell aggregator over all
cells, no shortcut), with the threshold chosen on every bag. Picking the best of many rows
on the bags it is then reported on is optimistic, so the same choice is made once per
outer fold on the *other* folds' bags only (their out-of-fold scores): the fold's bags
are scored by the row and threshold chosen without them. Those scores, pooled, give the
``nested`` row of the leaderboard (``nested_roc_auc`` and the rest): the honest figure
of the procedure that made the predictor. Rows differ in scale, so before pooling each
outer bag's score is read as its place among the inner negative bags' scores of the
chosen row (monotone within a fold; no outer label used); ``mean_fold_roc_auc`` is the
mean of the outer folds' own AUCs.

Metrics over the pooled out-of-fold bag scores: ROC AUC, balanced accuracy, sensitivity,
specificity at the fold's threshold, and log loss of the score read as a probability,
each with a percentile interval at ``[stats] confidence`` from a bootstrap over bags
(``[patients] n_boot`` resamples, seed ``[patients] seed``; stratified by label, so both
classes are in every resample). The best row by AUC is compared with each other row
by a paired bootstrap over bags (two-sided), Holm-adjusted.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.impute import SimpleImputer
from sklearn.model_selection import GroupKFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench.data.folds import column_by_row
from bench.run.context import RunContext, Stage
from bench.run.rundir import RunDir
from bench.stats.inference import bootstrap_resamples, holm
from core.candidate import build_candidate
from core.conformal import refer_band
from core.errors import BenchError
from core.progress import info, progress_iter, warn
from core.splits import PredefinedFolds
from ensembles.bags import (
    CELL_AGGREGATORS,
    MIN_CELLS_PERCENTILE,
    CompositionAggregator,
    aggregators_needing,
    choose_threshold,
    make_aggregator,
    min_cells_from_counts,
    negative_label,
)
from ensembles.mil import AttentionMIL
from features.extract import extract

INNER_FOLDS = 3
EPS = 1e-6


# ----------------------------------------------------------------------------- bags


class Bags:
    """Rows grouped into bags: names, each bag's rows, label (1 = positive) and fold."""

    def __init__(
        self, bag_of_row: np.ndarray, labels: np.ndarray, positive: int, folds: PredefinedFolds
    ):
        self.names, first, inverse = np.unique(bag_of_row, return_index=True, return_inverse=True)
        self.of_row = inverse
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(self.names)))[:-1]
        self.rows = np.split(order, bounds)
        self.y = (labels[first] == positive).astype(int)
        self.fold = np.asarray(folds.folds)[first]

    def __len__(self) -> int:
        return len(self.names)

    def n_cells(self) -> np.ndarray:
        return np.array([len(r) for r in self.rows])


# ----------------------------------------------------------------------------- metrics


def _auc_rows(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of ``scores`` (R, n) against labels ``y`` (ties count half)."""
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(scores, axis=-1)
    return (ranks[..., pos].sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def bootstrap_indices(y: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) bag indices resampled with replacement within each class
    (:func:`bench.stats.inference.bootstrap_resamples`)."""
    return np.array(list(bootstrap_resamples(len(y), n_boot, seed, strata=y)))


def _boot(scores, decisions, y, idx) -> dict:
    """Every metric on each resample ``idx`` (B, n) of the bags (labels in the same order
    in every resample, as :func:`bootstrap_indices` draws them)."""
    s, d, yy = scores[idx], decisions[idx], y[idx]  # (B, n)
    pos = yy == 1
    sens = (d & pos).sum(1) / pos.sum(1)
    spec = (~d & ~pos).sum(1) / (~pos).sum(1)
    p = np.clip(s, EPS, 1 - EPS)
    return {
        "roc_auc": _auc_rows(s, yy[0]),
        "balanced_accuracy": (sens + spec) / 2,
        "sensitivity": sens,
        "specificity": spec,
        "log_loss": -np.mean(yy * np.log(p) + (1 - yy) * np.log(1 - p), axis=1),
    }


METRIC_COLUMNS = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "log_loss")


# ----------------------------------------------------------------------------- choice


def choose_row(scores: dict, y: np.ndarray, keys: list[str]) -> str:
    """The row of ``keys`` a predictor carries, judged on the bags given (``scores``:
    row -> scores of these bags, ``y`` their labels): the best ROC AUC, ties broken by
    the lower log loss, then by the order of ``keys``."""
    S = np.stack([np.asarray(scores[k], dtype=float) for k in keys])
    auc = _auc_rows(S, y) if 0 < y.sum() < len(y) else np.zeros(len(keys))
    p = np.clip(S, EPS, 1 - EPS)
    ll = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p), axis=1)
    order = np.lexsort((np.arange(len(keys)), ll, -np.round(auc, 12)))
    return keys[int(order[0])]


def nested_selection(scores: dict, bags: "Bags", keys: list[str], rule: str):
    """Per outer fold, the row (:func:`choose_row`) and threshold chosen on the other
    folds' bags only; returns ``(nested scores, nested thresholds, per-fold choices)``,
    each bag scored by the row chosen without it."""
    out, thr, choices = np.zeros(len(bags)), np.zeros(len(bags)), []
    for k in np.unique(bags.fold):
        test, inner = bags.fold == k, bags.fold != k
        row = choose_row({key: scores[key][inner] for key in keys}, bags.y[inner], keys)
        t = choose_threshold(scores[row][inner], bags.y[inner], rule)
        # rows differ in scale (a top-k mean runs higher than a mean): each score is read
        # as its place among the inner negative bags' scores of the same row, so the
        # pooled figure compares folds on one scale; monotone, so within a fold nothing
        # changes, and no outer label is used
        neg = np.sort(scores[row][inner & (bags.y == 0)])
        out[test] = _negative_quantile(scores[row][test], neg)
        thr[test] = _negative_quantile(np.array([t]), neg)[0]
        test_y = bags.y[test]
        fold_auc = (
            float(_auc_rows(scores[row][test][None], test_y)[0])
            if 0 < test_y.sum() < len(test_y)
            else float("nan")
        )
        choices.append(
            {
                "fold": int(k),
                "row": row,
                "threshold": float(t),
                "n_inner_bags": int(inner.sum()),
                "n_test_bags": int(test.sum()),
                "roc_auc": fold_auc,
            }
        )
    return out, thr, choices


def _negative_quantile(values: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """The share of ``negatives`` (sorted) below each value, ties counted half: a score
    on the scale of the inner negative bags (1 - their false-positive rate); plus 1e-6
    times the value itself, so the map is strictly increasing and a threshold mapped the
    same way gives the same decisions."""
    values = np.asarray(values, dtype=float)
    lo = np.searchsorted(negatives, values, side="left")
    hi = np.searchsorted(negatives, values, side="right")
    return (lo + hi) / (2.0 * max(len(negatives), 1)) + 1e-6 * values


# ----------------------------------------------------------------------------- scores


def _fold_thresholds(scores: np.ndarray, bags: Bags, rule: str) -> np.ndarray:
    """Each bag's threshold, chosen on the bags of the other folds."""
    out = np.empty(len(bags))
    for k in np.unique(bags.fold):
        test = bags.fold == k
        out[test] = choose_threshold(scores[~test], bags.y[~test], rule)
    return out


def cell_aggregate(
    p_cell: np.ndarray,
    bags: Bags,
    name: str,
    settings: dict,
    bag_rows: list[np.ndarray] | None = None,
) -> np.ndarray:
    """Each bag's score from its cells' probabilities (``bag_rows``: only these rows of
    each bag; a bag left without a cell scores 0, no evidence)."""
    agg = make_aggregator(name, settings)
    return np.array(
        [
            agg.score_bag(p_cell[r]) if len(r) else 0.0
            for r in (bag_rows if bag_rows is not None else bags.rows)
        ]
    )


def read_cell_types(cfg, ds, n_bags: int) -> np.ndarray:
    """Each image's cell type (``[data] cell_types``) for the composition aggregator;
    refused when too few images have one (the runner asks before any unit runs)."""
    cell_types = column_by_row(ds.sources, cfg.path(cfg.data.cell_types), "cell_types")
    known = int((cell_types != "").sum())
    if known < 2 * n_bags:
        raise BenchError(f"[data] cell_types: only {known} of {len(ds)} images have a cell type")
    return cell_types


def composition_scores(
    features: np.ndarray,
    cell_types: np.ndarray,
    bags: Bags,
    settings: dict,
    show_progress: bool = True,
):
    """Out-of-fold bag scores of the composition route, the thresholds chosen on training
    bags (cross-validated scores of the patient model) and each bag's composition."""
    types = sorted(set(cell_types) - {""})
    t = np.array([types.index(c) if c else -1 for c in cell_types])
    seed = int(settings.seed)
    scores, thresholds = np.zeros(len(bags)), np.zeros(len(bags))
    comp_out = np.zeros((len(bags), len(types)))

    def fit_cells(rows):
        rows = rows[t[rows] >= 0]
        counts = np.bincount(t[rows], minlength=len(types))
        rows = rows[counts[t[rows]] >= 2]  # a class needs two cells for its covariance
        clf = make_pipeline(
            SimpleImputer(strategy="median"),
            StandardScaler(),
            LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"),
        )
        clf.fit(features[rows], t[rows])
        return clf

    def proba(clf, rows):
        out = np.zeros((len(rows), len(types)))
        out[:, clf.classes_] = clf.predict_proba(features[rows])
        return out

    def composition(cell_p, rows_of_bags, index_of_row):
        return np.stack([cell_p[[index_of_row[r] for r in rows]].mean(0) for rows in rows_of_bags])

    folds = np.unique(bags.fold)
    for k in progress_iter(
        folds, total=len(folds), desc="composition (cell types)", enabled=show_progress
    ):
        train_b, test_b = np.flatnonzero(bags.fold != k), np.flatnonzero(bags.fold == k)
        train_rows = np.concatenate([bags.rows[b] for b in train_b])
        test_rows = np.concatenate([bags.rows[b] for b in test_b])
        # the training bags' compositions from cell-type models that never saw the bag
        cell_p = np.zeros((len(train_rows), len(types)))
        inner = GroupKFold(n_splits=min(INNER_FOLDS, len(train_b)))
        for tr, te in inner.split(train_rows, groups=bags.of_row[train_rows]):
            cell_p[te] = proba(fit_cells(train_rows[tr]), train_rows[te])
        pos_of = {r: i for i, r in enumerate(train_rows)}
        comp_train = composition(cell_p, [bags.rows[b] for b in train_b], pos_of)
        test_p = proba(fit_cells(train_rows), test_rows)
        pos_of_test = {r: i for i, r in enumerate(test_rows)}
        comp_test = composition(test_p, [bags.rows[b] for b in test_b], pos_of_test)
        agg = CompositionAggregator(seed=seed).fit(comp_train, bags.y[train_b])
        scores[test_b] = agg.score(comp_test)
        comp_out[test_b] = comp_test
        cv = StratifiedKFold(
            n_splits=min(5, int(np.bincount(bags.y[train_b]).min())),
            shuffle=True,
            random_state=seed,
        )
        train_scores = cross_val_predict(
            agg.model_, comp_train, bags.y[train_b], cv=cv, method="predict_proba"
        )[:, 1]
        thresholds[test_b] = choose_threshold(train_scores, bags.y[train_b], settings.threshold)
    return scores, thresholds, comp_out, types


def mil_embeddings(cfg, images: np.ndarray, show_progress: bool = True) -> np.ndarray:
    """The cells' embeddings for attention MIL: the backbone of the run's
    ``[patients] mil_embeddings`` candidate (a ``transfer_frozen``; cached, so the
    candidate's own pass is reused)."""
    cand = build_candidate(cfg.candidates[check_mil(cfg)].spec())
    return cand.embed(np.asarray(images), progress=show_progress)


def check_mil(cfg) -> str:
    """The candidate named by ``[patients] mil_embeddings``, refused (one line) when it is
    not a ``transfer_frozen`` candidate of the run."""
    name = cfg.patients.mil_embeddings
    entry = cfg.candidates.get(name)
    if entry is None or entry.type != "transfer_frozen":
        raise BenchError(
            f"[patients] aggregators has 'attention', which needs "
            f"[patients] mil_embeddings to name a transfer_frozen candidate of "
            f"the run; '{name}' is "
            + (
                f"not one of the run's candidates {sorted(cfg.candidates)}"
                if entry is None
                else f"of type {entry.type}"
            )
        )
    return name


def mil_scores(embeddings: np.ndarray, bags: Bags, settings: dict, show_progress: bool = True):
    """Out-of-fold bag scores of attention MIL (:class:`ensembles.mil.AttentionMIL`) and
    the thresholds, chosen on the training bags' inner cross-validated scores."""
    seed = int(settings.seed)
    scores, thresholds = np.zeros(len(bags)), np.zeros(len(bags))
    of = lambda idx: [embeddings[bags.rows[b]] for b in idx]  # noqa: E731
    folds = np.unique(bags.fold)
    for k in progress_iter(folds, total=len(folds), desc="attention MIL", enabled=show_progress):
        train_b, test_b = np.flatnonzero(bags.fold != k), np.flatnonzero(bags.fold == k)
        y = bags.y[train_b]
        scores[test_b] = AttentionMIL(seed=seed).fit(of(train_b), y).score(of(test_b))
        inner = np.zeros(len(train_b))
        cv = StratifiedKFold(
            n_splits=min(INNER_FOLDS, int(np.bincount(y).min())), shuffle=True, random_state=seed
        )
        for tr, te in cv.split(train_b, y):
            inner[te] = AttentionMIL(seed=seed).fit(of(train_b[tr]), y[tr]).score(of(train_b[te]))
        thresholds[test_b] = choose_threshold(inner, y, settings.threshold)
    return scores, thresholds


# ----------------------------------------------------------------------------- the stage


def score_patients(
    run: RunDir,
    cfg,
    ds,
    board: pd.DataFrame,
    stored: dict,
    folds: PredefinedFolds,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Score every entry x aggregator per bag, write the patient leaderboard and its
    files (:meth:`RunDir.write_patients`); returns the patient leaderboard."""
    t0 = time.perf_counter()
    settings = cfg.patients
    positive = cfg.data.positive  # a class of the data: checked by prepare_run
    pos = ds.classes.index(positive)
    bags = Bags(run.bags, ds.labels, pos, folds)
    cell_types = (
        check_cell_types(cfg, ds, len(bags))
        if cfg.data.disease_cells or aggregators_needing(settings.aggregators, "needs_cell_types")
        else None
    )
    restrict = _disease_rows(cfg.data.disease_cells, cell_types, bags)
    rows, scores, thresholds = _cell_rows(cfg, board, stored, bags, pos, restrict)
    comp_types = _learned_rows(cfg, ds, bags, cell_types, rows, scores, thresholds, show_progress)
    nested = _nested_row(rows, scores, thresholds, bags, settings.threshold)
    table, best = _ranked_table(rows, scores, thresholds, bags, settings, cfg.stats.confidence)
    if nested is not None:
        r = table[table["kind"] == "nested"].iloc[0]
        nested.update(
            {
                f"nested_{m}{x}": float(r[f"{m}{x}"])
                for m in METRIC_COLUMNS
                for x in ("", "_lo", "_hi")
            }
        )
    warning = shortcut_warning(table, float(settings.shortcut_margin))
    negative = negative_label(ds.classes, positive)
    bag_table = _bag_table(table, scores, thresholds, bags, positive, negative)
    carry = choose_carried(table, None if nested is None else nested["chosen_on_all_bags"])
    cells = (
        _cell_table(run, ds, bags, stored, carry, pos)
        if carry is not None
        else pd.DataFrame(columns=["row", "bag", "source", "cell_probability"])
    )
    meta = {
        "positive": positive,
        "negative": negative,
        "classes": list(ds.classes),
        "n_bags": len(bags),
        "n_positive": int(bags.y.sum()),
        "threshold_rule": settings.threshold,
        "settings": dict(settings),
        "best": best,
        "carried": None if carry is None else carry,
        "composition_types": comp_types,
        "nested": nested,
        "shortcut_warning": warning,
        "disease_cells": list(cfg.data.disease_cells),
        "bags_without_disease_cells": (
            None if restrict is None else int(sum(len(r) == 0 for r in restrict))
        ),
        "bootstrap": {
            "n_boot": int(settings.n_boot),
            "stratified": True,
            "level": float(cfg.stats.confidence),
            "seed": int(settings.seed),
        },
        "seconds": time.perf_counter() - t0,
    }
    run.write_patients(table, bag_table, cells, meta)
    _say_result(table, nested, warning, len(bags))
    return table


def _cell_rows(cfg, board: pd.DataFrame, stored: dict, bags: Bags, pos: int, restrict):
    """Every entry x cell aggregator, over all cells and (with ``[data] disease_cells``)
    over the disease cells only: the rows, their bag scores and per-fold thresholds."""
    settings = cfg.patients
    kinds = dict(zip(board["candidate"], board["kind"]))
    shortcut = set(cfg.colour_only_candidates())
    rows, scores, thresholds = [], {}, {}
    for entry in board["candidate"]:
        p_cell = stored[entry][:, pos]
        for name in settings.aggregators:
            if name not in CELL_AGGREGATORS:
                continue
            for cells, bag_rows in (("all", None), ("disease", restrict)):
                if cells == "disease" and bag_rows is None:
                    continue
                key = f"{entry}+{name}" + ("[disease cells]" if cells == "disease" else "")
                scores[key] = cell_aggregate(p_cell, bags, name, settings, bag_rows)
                thresholds[key] = _fold_thresholds(scores[key], bags, settings.threshold)
                rows.append(
                    {
                        "entry": key,
                        "source": entry,
                        "kind": kinds[entry],
                        "aggregator": name,
                        "cells": cells,
                        "shortcut": entry in shortcut,
                    }
                )
    return rows, scores, thresholds


def _learned_rows(
    cfg, ds, bags: Bags, cell_types, rows: list, scores: dict, thresholds: dict, show_progress: bool
) -> list:
    """The aggregators fitted per fold (composition, attention MIL): their rows are
    appended in place; returns the composition's cell types (empty without one)."""
    settings = cfg.patients
    comp_types = []
    for name in aggregators_needing(settings.aggregators, "needs_cell_types"):
        fs_name = settings.composition_features
        feats = extract(np.asarray(ds.images), cfg.feature_sets[fs_name], progress=show_progress)
        key = f"cell_types[{fs_name}]+{name}"
        scores[key], thresholds[key], comp, comp_types = composition_scores(
            feats, cell_types, bags, settings, show_progress
        )
        rows.append(
            {
                "entry": key,
                "source": f"cell types ({fs_name} features)",
                "kind": "composition",
                "aggregator": name,
                "cells": "all",
                "shortcut": False,
            }
        )
    for name in aggregators_needing(settings.aggregators, "needs_embeddings"):
        emb = settings.mil_embeddings
        key = f"{emb}[embeddings]+{name}"
        scores[key], thresholds[key] = mil_scores(
            mil_embeddings(cfg, ds.images, show_progress), bags, settings, show_progress
        )
        rows.append(
            {
                "entry": key,
                "source": f"{emb} embeddings",
                "kind": "mil",
                "aggregator": name,
                "cells": "all",
                "shortcut": False,
            }
        )
    return comp_types


def _nested_row(rows: list, scores: dict, thresholds: dict, bags: Bags, rule: str) -> dict | None:
    """The predictor's row, and the same choice made per outer fold without its bags
    (appended to ``rows``); None when no row can be carried."""
    eligible = [r["entry"] for r in rows if _carriable(r)]
    if not eligible:
        return None
    scores[NESTED], thresholds[NESTED], choices = nested_selection(scores, bags, eligible, rule)
    rows.append(
        {
            "entry": NESTED,
            "source": "nested selection",
            "kind": "nested",
            "aggregator": "chosen per outer fold",
            "cells": "all",
            "shortcut": False,
        }
    )
    return {
        "choices": choices,
        "n_candidates": len(eligible),
        "mean_fold_roc_auc": float(np.nanmean([c["roc_auc"] for c in choices])),
        "scale": "each outer bag's score as the share of the inner negative "
        "bags' scores (same row) below it",
        "chosen_on_all_bags": choose_row(scores, bags.y, eligible),
    }


def _ranked_table(
    rows: list, scores: dict, thresholds: dict, bags: Bags, settings, level: float
) -> tuple[pd.DataFrame, str]:
    """Point metrics with bootstrap intervals at ``level``, ranked; every row compared
    with the best by a paired bootstrap over bags, Holm-adjusted. Returns the table
    (the nested row first, unranked) and the best row's name."""
    idx = bootstrap_indices(bags.y, int(settings.n_boot), int(settings.seed))
    boots = {}
    for r in rows:
        key = r["entry"]
        dec = scores[key] >= thresholds[key]
        point = _boot(scores[key], dec, bags.y, np.arange(len(bags))[None])
        r.update({m: float(v[0]) for m, v in point.items()})
        boots[key] = _boot(scores[key], dec, bags.y, idx)
        for m in METRIC_COLUMNS:
            lo, hi = np.nanpercentile(boots[key][m], [50 * (1 - level), 50 * (1 + level)])
            r[f"{m}_lo"], r[f"{m}_hi"] = float(lo), float(hi)
    table = pd.DataFrame([r for r in rows if r["kind"] != "nested"]).sort_values(
        ["roc_auc", "balanced_accuracy", "log_loss"], ascending=[False, False, True], kind="stable"
    )
    best = table["entry"].iloc[0]
    diffs = {
        k: boots[best]["roc_auc"] - b["roc_auc"]
        for k, b in boots.items()
        if k not in (best, NESTED)
    }
    p = {k: float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0)))) for k, d in diffs.items()}
    keys = list(p)
    adjusted = dict(zip(keys, holm([p[k] for k in keys]))) if keys else {}
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    nested_rows = [r for r in rows if r["kind"] == "nested"]
    if nested_rows:  # the procedure's figure: first, without a rank
        table = pd.concat([pd.DataFrame(nested_rows), table], ignore_index=True)
    table["auc_diff_vs_best"] = [
        float(np.mean(diffs[k])) if k in diffs else 0.0 for k in table["entry"]
    ]
    table["p_vs_best"] = [p.get(k, np.nan) for k in table["entry"]]
    table["p_vs_best_holm"] = [adjusted.get(k, np.nan) for k in table["entry"]]
    table["n_bags"] = len(bags)
    return table, best


def _bag_table(
    table: pd.DataFrame, scores: dict, thresholds: dict, bags: Bags, positive: str, negative: str
) -> pd.DataFrame:
    """One row per bag: its label, fold, cell count and every row's score and threshold."""
    bag_table = pd.DataFrame(
        {
            "bag": bags.names,
            "label": np.where(bags.y == 1, positive, negative),
            "y": bags.y,
            "fold": bags.fold,
            "n_cells": bags.n_cells(),
        }
    )
    score_cols = {}
    for key in table["entry"]:
        score_cols[f"score:{key}"] = scores[key]
        score_cols[f"threshold:{key}"] = thresholds[key]
    return pd.concat([bag_table, pd.DataFrame(score_cols)], axis=1)


def _say_result(table: pd.DataFrame, nested: dict | None, warning: str, n_bags: int) -> None:
    top = table[table["kind"] != "nested"].iloc[0]
    info(
        f"patients: best row {top['entry']} ROC AUC {top['roc_auc']:.3f} "
        f"[{top['roc_auc_lo']:.3f}, {top['roc_auc_hi']:.3f}] over {n_bags} bags"
    )
    if nested is not None:
        info(
            f"patients: nested selection (the predictor's procedure) ROC AUC "
            f"{nested['nested_roc_auc']:.3f} [{nested['nested_roc_auc_lo']:.3f}, "
            f"{nested['nested_roc_auc_hi']:.3f}]"
        )
    if warning:
        warn(f"patients: {warning}")


NESTED = "nested selection"


def _carriable(r) -> bool:
    """A row a predictor can apply to a new patient's cells: a cell aggregator over all
    of them, not a shortcut baseline."""
    return (
        r["aggregator"] in CELL_AGGREGATORS
        and r.get("cells", "all") == "all"
        and not bool(r.get("shortcut", False))
    )


def choose_carried(table: pd.DataFrame, row: str | None) -> dict | None:
    """What a predictor carries of patient row ``row`` (chosen by :func:`choose_row`
    among the carriable rows; ``None`` when there was none)."""
    if row is None:
        return None
    r = table[table["entry"] == row].iloc[0]
    return {
        "entry": str(r["source"]),
        "aggregator": str(r["aggregator"]),
        "row": str(r["entry"]),
        "roc_auc": float(r["roc_auc"]),
    }


def shortcut_warning(table: pd.DataFrame, margin: float) -> str:
    """A line when the best shortcut (colour-only) row comes within ``margin`` of the ROC
    AUC of the best other model row, else ``""``."""
    if "shortcut" not in table or not table["shortcut"].any():
        return ""
    models = table[~table["shortcut"].astype(bool) & (table["kind"] != "nested")]
    cut = table[table["shortcut"].astype(bool)].sort_values("roc_auc", ascending=False)
    if models.empty:
        return ""
    s, b = cut.iloc[0], models.sort_values("roc_auc", ascending=False).iloc[0]
    if float(s["roc_auc"]) < float(b["roc_auc"]) - margin:
        return ""
    return (
        f"the colour-only row {s['entry']} reaches ROC AUC {s['roc_auc']:.3f}, within "
        f"{margin:.2f} of the best row {b['entry']} ({b['roc_auc']:.3f}): the smears' "
        "colour may give the diagnosis away in this cohort, and the models may read it "
        'too (try [patients] bag_jitter = 0.1 with bag_colour = "rgb": '
        'benchmarks/README.md, "Patients on a new cohort")'
    )


def check_cell_types(cfg, ds, n_bags: int) -> np.ndarray:
    """Each image's cell type, refused (one line) when too few images have one or when
    ``[data] disease_cells`` names a type none has; the runner asks before any unit."""
    types = read_cell_types(cfg, ds, n_bags)
    unknown = sorted(set(cfg.data.disease_cells) - set(types))
    if unknown:
        raise BenchError(
            f"[data] disease_cells: {unknown} not among the cell types of "
            f"[data] cell_types ({sorted(set(types) - {''})})"
        )
    return types


def _disease_rows(wanted, cell_types, bags: Bags) -> list[np.ndarray] | None:
    """Each bag's rows of the ``[data] disease_cells`` types ``wanted`` (``cell_types``:
    each row's type), or ``None`` without them."""
    if not wanted:
        return None
    keep = np.isin(cell_types, list(wanted))
    return [r[keep[r]] for r in bags.rows]


def _cell_table(run, ds, bags: Bags, stored, carry: dict, pos: int) -> pd.DataFrame:
    p = stored[carry["entry"]][:, pos]
    return pd.DataFrame(
        {
            "row": np.arange(len(ds)),
            "bag": bags.names[bags.of_row],
            "source": ds.sources,
            "cell_probability": p,
        }
    )


def final_threshold(bag_table: pd.DataFrame, row: str, rule: str) -> float:
    """The threshold a predictor stores: chosen on every bag's out-of-fold score."""
    return choose_threshold(bag_table[f"score:{row}"].to_numpy(), bag_table["y"].to_numpy(), rule)


def bag_settings(cfg, patients, name: str) -> dict:
    """What a bag task's predictor stores: the aggregator of ``name``'s best patient row
    and its threshold, chosen on every bag's out-of-fold score."""
    board, bag_table, _, meta = patients
    carried = meta.get("carried") or {}
    rows = board[
        (board["source"] == name)
        & board["aggregator"].isin(CELL_AGGREGATORS)
        & (board.get("cells", "all") == "all")
    ]
    if carried.get("entry") == name:
        rows = rows[rows["entry"] == carried["row"]]
    r = rows.iloc[0]
    params = make_aggregator(r["aggregator"], cfg.patients).params()
    min_cells = cfg.patients.min_cells
    rule = f"[patients] min_cells = {min_cells}"
    if min_cells == "auto":
        min_cells = min_cells_from_counts(bag_table["n_cells"])
        rule = (
            f"the {MIN_CELLS_PERCENTILE}th percentile of the {len(bag_table)} training "
            "bags' cell counts"
        )
    threshold = final_threshold(bag_table, r["entry"], meta["threshold_rule"])
    return {
        "positive": meta["positive"],
        "aggregator": r["aggregator"],
        "params": params,
        "min_cells": int(min_cells),
        "min_cells_rule": rule,
        "threshold": threshold,
        "refer_band": refer_band(
            bag_table[f"score:{r['entry']}"].to_numpy(), bag_table["y"].to_numpy() == 1, threshold
        ),
        "threshold_rule": meta["threshold_rule"] + " on every bag's out-of-fold score",
        "patient_leaderboard": {
            k: float(r[k])
            for k in (
                "roc_auc",
                "roc_auc_lo",
                "roc_auc_hi",
                "balanced_accuracy",
                "sensitivity",
                "specificity",
            )
        }
        | {k: v for k, v in (meta.get("nested") or {}).items() if k.startswith("nested_")},
        **(
            {"colour": {"bag_colour": cfg.patients.bag_colour}}
            if cfg.patients.bag_colour != "none"
            else {}
        ),
    }


def _patients_stage(ctx: RunContext) -> None:
    score_patients(
        ctx.run, ctx.cfg, ctx.ds, ctx.board, ctx.stored, ctx.run.folds, ctx.show_progress
    )
    ctx.bag_choice = ctx.run.read_patients()


#: ``[data] bags = true``: the patient leaderboard (before the predictor, which carries its row)
STAGE = Stage("patients", _patients_stage, lambda ctx: ctx.cfg.data.bags)


__all__ = [
    "score_patients",
    "read_cell_types",
    "choose_carried",
    "choose_row",
    "nested_selection",
    "shortcut_warning",
    "check_cell_types",
    "check_mil",
    "mil_scores",
    "final_threshold",
    "Bags",
    "bootstrap_indices",
    "composition_scores",
    "bag_settings",
    "NESTED",
]
