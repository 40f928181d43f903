"""Bag (patient-level) tasks: from out-of-fold cell probabilities to a patient leaderboard.

A dataset with ``[data] bags = true`` labels each image with its bag's label (a patient's
diagnosis); the folds hold whole bags, stratified by the bags' labels
(:func:`bench.data.folds.make_bag_folds`). Every candidate and ensemble is trained and scored
on cells as usual; this stage turns their out-of-fold cell probabilities into one score
per bag with each aggregator of ``[patients] aggregators`` (:mod:`ensembles.bags`):

* ``mean``, ``trimmed_mean``, ``top_k_mean`` of the positive class's cell probabilities.
  A bag's cells are all in one fold, so its score comes from the fold models that never
  saw it;
* the **cell-type stage** (:class:`CellTypeStage`, with ``[data] cell_types``): per outer
  fold, a cell-type model (shrinkage LDA on the ``composition_features`` feature set) is
  fitted on the training bags' cells only, cross-fitted over those bags (inner grouped
  folds) for their own types, and types the fold's cells. From it: ``composition`` (a
  logistic regression on the bags' mean cell-type probabilities), ``type_model`` (one per
  entry: a logistic regression on the composition and each type's mean cell probability,
  :func:`ensembles.celltypes.type_profile`), and, with ``[data] disease_cells``, the
  ``[typed cells]`` rows (each cell aggregator over the cells likely of a diagnostic type).

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
cells or the typed cells, or a type model; no shortcut), with the threshold and the
referral band (at most ``[patients] refer_rate`` of the bags) chosen on every bag. Picking the best of many rows
on the bags it is then reported on is optimistic, so the same choice is made once per
outer fold on the *other* folds' bags only (their out-of-fold scores): the fold's bags
are scored by the row and threshold chosen without them. Those scores, pooled, give the
``nested`` row of the leaderboard (``nested_roc_auc`` and the rest): the honest figure
of the procedure that made the predictor, and the bands drawn per outer fold give the
nested risk-referral curve. Rows differ in scale, so before pooling each
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

import functools
import time

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.model_selection import GroupKFold, StratifiedKFold, cross_val_predict

from bench.data.folds import column_by_row
from bench.run.context import RunContext, Stage
from bench.run.rundir import RunDir
from bench.stats.inference import bootstrap_resamples, holm
from core.candidate import build_candidate
from core.conformal import refer_band, referral_curve
from core.errors import BenchError
from core.progress import info, progress_iter, warn
from core.splits import PredefinedFolds
from ensembles.bags import (
    TypeModelAggregator,
    CARRIED_AGGREGATORS,
    CELL_AGGREGATORS,
    MIN_CELLS_PERCENTILE,
    CompositionAggregator,
    aggregators_needing,
    choose_threshold,
    make_aggregator,
    min_cells_from_counts,
    negative_label,
)
from ensembles.celltypes import (
    TYPED_CUT,
    disease_probability,
    type_profile,
    typed_cells,
)
from ensembles.mil import AttentionMIL

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


#: the most a referral band may hold, for the nested risk-referral curve (``[patients]
#: refer_rate`` is added to these)
REFERRAL_RATES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


def nested_selection(scores: dict, bags: "Bags", keys: list[str], rule: str, refer_rates=()):
    """Per outer fold, the row (:func:`choose_row`), threshold and referral bands (one per
    ``refer_rates``, :func:`core.conformal.refer_band`) chosen on the other folds' bags
    only; returns ``(nested scores, nested thresholds, per-fold choices, bands)``, each bag
    scored by the row chosen without it; ``bands``: ``{rate: (lo, hi)}`` per bag, on the
    same scale as the scores."""
    out, thr, choices = np.zeros(len(bags)), np.zeros(len(bags)), []
    bands = {r: (np.zeros(len(bags)), np.zeros(len(bags))) for r in refer_rates}
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
        for rate, (lo, hi) in bands.items():
            band = refer_band(scores[row][inner], bags.y[inner] == 1, t, rate)
            if band["n_inside"]:
                lo[test], hi[test] = _negative_quantile(np.array([band["lo"], band["hi"]]), neg)
            else:  # no band: nobody referred
                lo[test], hi[test] = np.inf, -np.inf
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
    return out, thr, choices, bands


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


#: the cell-type model's candidate type (:class:`baselines.models.FeatureLDA`)
CELL_TYPE_MODEL = "feature_lda"


class CellTypeStage:
    """The cell-type stage's out-of-fold answers (:mod:`ensembles.celltypes`): per outer
    fold, a cell-type model (:data:`CELL_TYPE_MODEL` on ``[patients]
    composition_features``) fitted on the training bags' cells only scores the fold's
    cells (``oof``: every cell by a model that never saw its bag), and the training bags'
    own cells are cross-fitted over inner grouped folds (``inner[k]``: their rows and
    type probabilities), for the patient models fitted on them. :meth:`final` (fitted on
    every typed cell, only when a carried row needs it) is what a predictor carries."""

    def __init__(
        self, images, features: dict, cell_types: np.ndarray, bags: Bags, show_progress=True
    ):
        self.types = sorted(set(cell_types) - {""})
        self.features = features
        t = np.array([self.types.index(c) if c else -1 for c in cell_types])
        T = len(self.types)
        images = np.asarray(images)
        spec = {"type": CELL_TYPE_MODEL, "params": {"features": features}}

        self._fit = fit = functools.partial(self._fit_rows, images, t, spec, T)

        self.oof = np.zeros((len(t), T))
        self.inner: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        folds = np.unique(bags.fold)
        for k in progress_iter(folds, total=len(folds), desc="cell types", enabled=show_progress):
            train_b, test_b = np.flatnonzero(bags.fold != k), np.flatnonzero(bags.fold == k)
            train_rows = np.concatenate([bags.rows[b] for b in train_b])
            test_rows = np.concatenate([bags.rows[b] for b in test_b])
            cell_p = np.zeros((len(train_rows), T))
            inner = GroupKFold(n_splits=min(INNER_FOLDS, len(train_b)))
            for tr, te in inner.split(train_rows, groups=bags.of_row[train_rows]):
                cell_p[te] = fit(train_rows[tr]).predict_proba(images[train_rows[te]])
            self.inner[int(k)] = (train_rows, cell_p)
            self.oof[test_rows] = fit(train_rows).predict_proba(images[test_rows])
        self._n = len(t)
        known = t >= 0
        self.accuracy = (
            float(np.mean(self.oof[known].argmax(1) == t[known])) if known.any() else 0.0
        )

    @staticmethod
    def _fit_rows(images, t, spec, n_types, rows):
        rows = rows[t[rows] >= 0]
        counts = np.bincount(t[rows], minlength=n_types)
        rows = rows[counts[t[rows]] >= 2]  # a class needs two cells for its covariance
        return build_candidate(spec).fit(images[rows], t[rows], classes=np.arange(n_types))

    @functools.cached_property
    def final(self):
        """The cell-type model fitted on every typed cell (what a predictor carries)."""
        return self._fit(np.arange(self._n))

    def disease_index(self, disease) -> list[int]:
        return [self.types.index(c) for c in disease if c in self.types]

    def typed_rows(self, bags: Bags, disease) -> list[np.ndarray]:
        """Each bag's rows likely of a diagnostic type (out of fold; all rows of a bag
        without one: :func:`ensembles.celltypes.typed_cells`)."""
        p = disease_probability(self.oof, self.disease_index(disease))
        return [r[typed_cells(p[r])] for r in bags.rows]


def _fold_fit(stage: CellTypeStage, bags: Bags, make, features_of, settings, show, desc):
    """Out-of-fold bag scores of a patient model (``make()``, fitted per outer fold on the
    training bags' rows from ``features_of(type_proba, rows)``) and the thresholds chosen on
    the training bags' cross-validated scores."""
    seed = int(settings.seed)
    scores, thresholds = np.zeros(len(bags)), np.zeros(len(bags))
    folds = np.unique(bags.fold)
    for k in progress_iter(folds, total=len(folds), desc=desc, enabled=show):
        train_b, test_b = np.flatnonzero(bags.fold != k), np.flatnonzero(bags.fold == k)
        train_rows, cell_p = stage.inner[int(k)]
        pos_of = {r: i for i, r in enumerate(train_rows)}
        X_train = np.stack(
            [features_of(cell_p[[pos_of[r] for r in bags.rows[b]]], bags.rows[b]) for b in train_b]
        )
        X_test = np.stack([features_of(stage.oof[bags.rows[b]], bags.rows[b]) for b in test_b])
        agg = make().fit(X_train, bags.y[train_b])
        scores[test_b] = agg.score(X_test)
        cv = StratifiedKFold(
            n_splits=min(5, int(np.bincount(bags.y[train_b]).min())),
            shuffle=True,
            random_state=seed,
        )
        train_scores = cross_val_predict(
            agg.model_, X_train, bags.y[train_b], cv=cv, method="predict_proba"
        )[:, 1]
        thresholds[test_b] = choose_threshold(train_scores, bags.y[train_b], settings.threshold)
    return scores, thresholds


def composition_scores(stage: CellTypeStage, bags: Bags, settings, show_progress: bool = True):
    """Out-of-fold bag scores of the composition route (a logistic regression on the
    bags' mean cell-type probabilities) and the thresholds chosen on training bags."""
    seed = int(settings.seed)
    return _fold_fit(
        stage,
        bags,
        lambda: CompositionAggregator(seed=seed),
        lambda type_p, rows: type_p.mean(0),
        settings,
        show_progress,
        "composition (cell types)",
    )


def type_model_scores(
    stage: CellTypeStage, p_cell: np.ndarray, bags: Bags, settings, show_progress: bool = False
):
    """Out-of-fold bag scores of :class:`ensembles.bags.TypeModelAggregator` over an
    entry's out-of-fold cell probabilities ``p_cell``, and the thresholds."""
    seed = int(settings.seed)
    return _fold_fit(
        stage,
        bags,
        lambda: TypeModelAggregator(seed=seed),
        lambda type_p, rows: type_profile(type_p, p_cell[rows]),
        settings,
        show_progress,
        "type model",
    )


def final_type_model(stage: CellTypeStage, p_cell: np.ndarray, bags: Bags, seed: int):
    """The type model a predictor carries: fitted on every bag's profile (out-of-fold cell
    types and cell probabilities)."""
    X = np.stack([type_profile(stage.oof[r], p_cell[r]) for r in bags.rows])
    return TypeModelAggregator(seed=seed).fit(X, bags.y).linear()


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
    stage = (
        CellTypeStage(
            ds.images,
            cfg.feature_sets[settings.composition_features],
            cell_types,
            bags,
            show_progress,
        )
        if cell_types is not None
        else None
    )
    typed = stage.typed_rows(bags, cfg.data.disease_cells) if restrict is not None else None
    rows, scores, thresholds = _cell_rows(cfg, board, stored, bags, pos, restrict, typed)
    _learned_rows(cfg, ds, bags, stage, stored, pos, board, rows, scores, thresholds, show_progress)
    nested = _nested_row(rows, scores, thresholds, bags, settings)
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
    if carry is not None and stage is not None:
        carry.update(_carried_models(run, cfg, stage, stored, bags, pos, carry))
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
        "composition_types": [] if stage is None else list(stage.types),
        "nested": nested,
        "shortcut_warning": warning,
        "disease_cells": list(cfg.data.disease_cells),
        "bags_without_disease_cells": (
            None if restrict is None else int(sum(len(r) == 0 for r in restrict))
        ),
        "cell_type_stage": None
        if stage is None
        else {
            "model": CELL_TYPE_MODEL,
            "features": settings.composition_features,
            "types": stage.types,
            "out_of_fold_accuracy": stage.accuracy,
            "typed_cut": TYPED_CUT,
            "mean_typed_cells": (
                None if typed is None else float(np.mean([len(r) for r in typed]))
            ),
            "bags_scored_on_all_cells": (
                None
                if typed is None
                else int(sum(len(t) == len(r) for t, r in zip(typed, bags.rows)))
            ),
        },
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


#: the cells a row aggregates: every cell, the analyser's diagnostic types (``[data]
#: disease_cells``, not carriable: new cells have no such labels), or the cells the run's
#: cell-type model finds likely diagnostic (carriable)
CELL_SETS = {"all": "", "disease": "[disease cells]", "typed": "[typed cells]"}


def _cell_rows(cfg, board: pd.DataFrame, stored: dict, bags: Bags, pos: int, restrict, typed):
    """Every entry x cell aggregator, over all cells and (with ``[data] disease_cells``)
    over the analyser's disease cells and over the typed cells: the rows, their bag scores
    and per-fold thresholds."""
    settings = cfg.patients
    kinds = dict(zip(board["candidate"], board["kind"]))
    shortcut = set(cfg.colour_only_candidates())
    rows, scores, thresholds = [], {}, {}
    for entry in board["candidate"]:
        p_cell = stored[entry][:, pos]
        for name in settings.aggregators:
            if name not in CELL_AGGREGATORS:
                continue
            for cells, bag_rows in (("all", None), ("disease", restrict), ("typed", typed)):
                if cells != "all" and bag_rows is None:
                    continue
                key = f"{entry}+{name}{CELL_SETS[cells]}"
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
    cfg,
    ds,
    bags: Bags,
    stage: CellTypeStage | None,
    stored: dict,
    pos: int,
    board: pd.DataFrame,
    rows: list,
    scores: dict,
    thresholds: dict,
    show_progress: bool,
) -> None:
    """The aggregators fitted per fold (composition, the type model of every entry,
    attention MIL): their rows are appended in place."""
    settings = cfg.patients
    fs_name = settings.composition_features
    aggs = settings.aggregators
    if "composition" in aggs:
        key = f"cell_types[{fs_name}]+composition"
        scores[key], thresholds[key] = composition_scores(stage, bags, settings, show_progress)
        rows.append(
            {
                "entry": key,
                "source": f"cell types ({fs_name} features)",
                "kind": "composition",
                "aggregator": "composition",
                "cells": "all",
                "shortcut": False,
            }
        )
    if TypeModelAggregator.name in aggs:
        kinds = dict(zip(board["candidate"], board["kind"]))
        shortcut = set(cfg.colour_only_candidates())
        for entry in progress_iter(
            list(board["candidate"]), desc="type models", enabled=show_progress
        ):
            key = f"{entry}+{TypeModelAggregator.name}"
            scores[key], thresholds[key] = type_model_scores(
                stage, stored[entry][:, pos], bags, settings
            )
            rows.append(
                {
                    "entry": key,
                    "source": entry,
                    "kind": kinds[entry],
                    "aggregator": TypeModelAggregator.name,
                    "cells": "all",
                    "shortcut": entry in shortcut,
                }
            )
    for name in aggregators_needing(aggs, "needs_embeddings"):
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


def _carried_models(run, cfg, stage: CellTypeStage, stored, bags: Bags, pos: int, carry) -> dict:
    """The models a carried row over cell types needs (the cell-type model, and the type
    model for ``type_model``), written into the run (:meth:`RunDir.patient_model_dir`);
    what the carried row records of them. Nothing for a row over all cells."""
    if carry["cells"] != "typed" and carry["aggregator"] != TypeModelAggregator.name:
        return {}
    out = {
        "cell_types": {
            "types": list(stage.types),
            "disease": [t for t in cfg.data.disease_cells if t in stage.types],
            "cut": TYPED_CUT,
            "features": stage.features,
            "accuracy": stage.accuracy,
        }
    }
    with run.patient_model_dir("cell_types") as tmp:
        stage.final.save(tmp)
    if carry["aggregator"] == TypeModelAggregator.name:
        model = final_type_model(
            stage, stored[carry["entry"]][:, pos], bags, int(cfg.patients.seed)
        )
        run.write_patient_model("type_model", model.to_bytes())
    return out


def _nested_row(rows: list, scores: dict, thresholds: dict, bags: Bags, settings) -> dict | None:
    """The predictor's row, and the same choice made per outer fold without its bags
    (appended to ``rows``), with the nested risk-referral curve; None when no row can be
    carried."""
    eligible = [r["entry"] for r in rows if _carriable(r)]
    if not eligible:
        return None
    rate = float(settings.refer_rate)
    rates = sorted({*REFERRAL_RATES, rate})
    scores[NESTED], thresholds[NESTED], choices, bands = nested_selection(
        scores, bags, eligible, settings.threshold, rates
    )
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
    curve = referral_curve(scores[NESTED], bags.y == 1, thresholds[NESTED], bands)
    at = next(c for c in curve if c["max_rate"] == rate)
    return {
        "choices": choices,
        "n_candidates": len(eligible),
        "mean_fold_roc_auc": float(np.nanmean([c["roc_auc"] for c in choices])),
        "scale": "each outer bag's score as the share of the inner negative "
        "bags' scores (same row) below it",
        "chosen_on_all_bags": choose_row(scores, bags.y, eligible),
        "referral_curve": curve,
        "refer_rate": rate,
        "referral": at,
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
    of them or over the typed cells, or a type model; not a shortcut baseline."""
    return (
        r["aggregator"] in CARRIED_AGGREGATORS
        and r.get("cells", "all") in ("all", "typed")
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
        "cells": str(r.get("cells", "all")),
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


def bag_settings(cfg, patients, name: str) -> tuple[dict, dict]:
    """What a bag task's predictor stores: the aggregator of ``name``'s carried patient row
    (else its best row over all cells) and its threshold and referral band, chosen on every
    bag's out-of-fold score; and the files it needs from the run (``{folder in the
    predictor: folder or file in the run}``: the cell-type model and the type model of a
    row over cell types)."""
    board, bag_table, _, meta = patients
    carried = meta.get("carried") or {}
    if carried.get("entry") == name:
        r = board[board["entry"] == carried["row"]].iloc[0]
    else:
        r = board[
            (board["source"] == name)
            & board["aggregator"].isin(CELL_AGGREGATORS)
            & (board.get("cells", "all") == "all")
        ].iloc[0]
    aggregator, cells = str(r["aggregator"]), str(r.get("cells", "all"))
    params = (
        make_aggregator(aggregator, cfg.patients).params() if aggregator in CELL_AGGREGATORS else {}
    )
    min_cells = cfg.patients.min_cells
    rule = f"[patients] min_cells = {min_cells}"
    if min_cells == "auto":
        min_cells = min_cells_from_counts(bag_table["n_cells"])
        rule = (
            f"the {MIN_CELLS_PERCENTILE}th percentile of the {len(bag_table)} training "
            "bags' cell counts"
        )
    threshold = final_threshold(bag_table, r["entry"], meta["threshold_rule"])
    band = refer_band(
        bag_table[f"score:{r['entry']}"].to_numpy(),
        bag_table["y"].to_numpy() == 1,
        threshold,
        float(cfg.patients.refer_rate),
    )
    files, cell_types = {}, None
    if carried.get("entry") == name and "cell_types" in carried:
        cell_types = dict(carried["cell_types"], model=f"{BAG_FILES}/cell_types")
        files[f"{BAG_FILES}/cell_types"] = "cell_types"
        if aggregator == TypeModelAggregator.name:
            cell_types["type_model"] = f"{BAG_FILES}/type_model.npz"
            files[f"{BAG_FILES}/type_model.npz"] = "type_model.npz"
    nested = meta.get("nested") or {}
    settings = {
        "positive": meta["positive"],
        "aggregator": aggregator,
        "cells": cells,
        "params": params,
        "min_cells": int(min_cells),
        "min_cells_rule": rule,
        "threshold": threshold,
        "refer_band": band,
        "refer_rate": float(cfg.patients.refer_rate),
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
        | {k: v for k, v in nested.items() if k.startswith("nested_")},
        **({"referral_curve": nested["referral_curve"]} if "referral_curve" in nested else {}),
        **({"cell_types": cell_types} if cell_types else {}),
        **(
            {"colour": {"bag_colour": cfg.patients.bag_colour}}
            if cfg.patients.bag_colour != "none"
            else {}
        ),
    }
    return settings, files


#: the folder of a predictor that holds a bag task's own models (cell types, type model)
BAG_FILES = "bag"


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
