"""Bag aggregators: from the cells of a bag (a patient) to one score for the bag.

The label of a bag task belongs to the bag (a patient's diagnosis), not to its cells.
Candidates are trained on cells with their bag's label (weak labels) and give each cell
a probability of the positive class; an aggregator turns a bag's cell probabilities into
the bag's score:

* :class:`MeanAggregator`: the mean (DeepAPL's own rule);
* :class:`TrimmedMeanAggregator`: the mean without the lowest and highest ``trim``;
* :class:`TopKMeanAggregator`: the mean of the ``fraction`` most positive cells (a few
  typical cells decide, as a morphologist would call APL from its promyelocytes).

:class:`CompositionAggregator` is the other route: the bag's cell-type composition (the
mean of its cells' cell-type probabilities, from a cell-type classifier) fed to a small
patient-level logistic regression. It is fitted, on training bags only.

:func:`choose_threshold` picks the decision threshold on training bags' scores. None of
these see anything but the arrays they are given: the caller keeps test bags out of every
``fit`` and threshold.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

import numpy as np
from scipy import stats as _st
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from core.shift import ShiftReference
from ensembles.celltypes import LinearModel, disease_probability, type_profile, typed_cells
from ensembles.mil import AttentionMIL


class MeanAggregator:
    """Mean of a bag's cell probabilities."""

    name = "mean"
    needs_fit = False
    needs_embeddings = False  # reads cell probabilities
    settings: dict[str, str] = {}  # [patients] key -> argument of __init__

    def params(self) -> dict:
        return {}

    def score_bag(self, p: np.ndarray) -> float:
        return float(np.mean(p))

    def score(self, bags: list[np.ndarray]) -> np.ndarray:
        return np.array([self.score_bag(np.asarray(p, dtype=float)) for p in bags])


class TrimmedMeanAggregator(MeanAggregator):
    """Mean without the ``trim`` lowest and ``trim`` highest cells of a bag."""

    name = "trimmed_mean"
    settings = {"trim": "trim"}

    def __init__(self, trim: float):
        if not 0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        self.trim = float(trim)

    def params(self) -> dict:
        return {"trim": self.trim}

    def score_bag(self, p: np.ndarray) -> float:
        return float(_st.trim_mean(p, self.trim))


class TopKMeanAggregator(MeanAggregator):
    """Mean of the ``ceil(fraction * n)`` highest cell probabilities of a bag of n cells."""

    name = "top_k_mean"
    settings = {"top_fraction": "fraction"}

    def __init__(self, fraction: float):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)

    def params(self) -> dict:
        return {"top_fraction": self.fraction}

    def score_bag(self, p: np.ndarray) -> float:
        k = max(1, math.ceil(self.fraction * len(p)))
        return float(np.mean(np.sort(p)[-k:]))


class CompositionAggregator:
    """Logistic regression on bags' cell-type compositions (rows sum to one).

    ``fit(composition, y)`` with ``y`` 1 for positive bags; ``score`` gives the positive
    probability. Standardised inputs, L2 strength ``C``, balanced class weights.
    """

    name = "composition"
    needs_fit = True
    needs_embeddings = False  # reads hand-crafted cell features
    needs_cell_types = True  # fitted on each training cell's type ([data] cell_types)
    settings = {"seed": "seed"}

    def __init__(self, C: float = 1.0, seed: int = 0):
        self.C, self.seed = float(C), int(seed)

    def params(self) -> dict:
        return {"C": self.C}

    def fit(self, composition: np.ndarray, y: np.ndarray) -> "CompositionAggregator":
        y = np.asarray(y).astype(int)
        if len(np.unique(y)) < 2:
            raise ValueError("a composition model needs positive and negative bags")
        self.model_ = make_pipeline(
            StandardScaler(),
            LogisticRegression(
                C=self.C, class_weight="balanced", max_iter=2000, random_state=self.seed
            ),
        )
        self.model_.fit(np.asarray(composition, dtype=float), y)
        return self

    def score(self, composition: np.ndarray) -> np.ndarray:
        return self.model_.predict_proba(np.asarray(composition, dtype=float))[:, 1]


class TypeModelAggregator(CompositionAggregator):
    """The composition model on bags' :func:`ensembles.celltypes.type_profile` rows (type
    composition, each type's mean positive probability, the bag's mean): a patient-level
    model over cell types, stronger L2 (``C = 0.1``: twice as many inputs). A predictor
    stores it as arrays (:meth:`linear`)."""

    name = "type_model"
    needs_embeddings = False  # reads cell probabilities and cell types

    def __init__(self, C: float = 0.1, seed: int = 0):
        super().__init__(C, seed)

    def linear(self) -> LinearModel:
        return LinearModel.from_pipeline(self.model_, 2)


def negative_label(classes: list[str], positive: str) -> str:
    """What a bag that is not ``positive`` is called: the other class of a two-class task,
    else ``"not <positive>"``."""
    others = [str(c) for c in classes if str(c) != positive]
    return others[0] if len(others) == 1 else f"not {positive}"


#: every aggregator by name (``[patients] aggregators``, a bag predictor's ``aggregator``);
#: ``attention`` (:class:`ensembles.mil.AttentionMIL`) pools a frozen backbone's cell
#: embeddings rather than cell probabilities
AGGREGATORS = {
    cls.name: cls
    for cls in (
        MeanAggregator,
        TrimmedMeanAggregator,
        TopKMeanAggregator,
        CompositionAggregator,
        TypeModelAggregator,
        AttentionMIL,
    )
}
#: the default ``[patients] aggregators``: all but those that need a backbone's cell
#: embeddings (declared by ``needs_embeddings``; they need a frozen candidate in the run)
DEFAULT_AGGREGATORS = tuple(n for n, cls in AGGREGATORS.items() if not cls.needs_embeddings)
#: the aggregators of cell probabilities alone (no fit): what a saved predictor can carry
CELL_AGGREGATORS = tuple(n for n, cls in AGGREGATORS.items() if not cls.needs_fit)
#: what a saved predictor's bag task can apply: the cell aggregators and the type model
#: (with the cell-type model it reads, stored as arrays: :mod:`ensembles.celltypes`)
CARRIED_AGGREGATORS = (*CELL_AGGREGATORS, TypeModelAggregator.name)


def aggregators_needing(names, need: str) -> list[str]:
    """Those of the aggregators ``names`` that declare ``need`` (``"needs_fit"``,
    ``"needs_embeddings"``, ``"needs_cell_types"``): what a run must provide for them."""
    return [n for n in names if getattr(AGGREGATORS[n], need, False)]


def make_aggregator(name: str, settings):
    """The aggregator called ``name`` with the typed ``[patients]`` settings, or a mapping
    of the same keys (its own :meth:`params`, as a saved predictor stores them)."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator '{name}'")
    cls = AGGREGATORS[name]
    get = (
        settings.__getitem__
        if isinstance(settings, Mapping)
        else lambda key: getattr(settings, key)
    )
    return cls(**{arg: get(key) for key, arg in cls.settings.items()})


def choose_threshold(scores: np.ndarray, y: np.ndarray, rule: str = "youden") -> float:
    """Decision threshold (``score >= t`` is positive) chosen on training bags.

    ``"youden"``: the cut maximising sensitivity + specificity - 1 (balanced accuracy),
    midway between neighbouring scores, ties broken toward 0.5; ``"half"``: 0.5;
    ``"sensitivity:X"``: the highest cut that keeps at least a fraction X of the positive
    bags at or above it (midway between the last positive it must keep and the next lower
    score): the best specificity at that sensitivity.
    """
    if rule == "half":
        return 0.5
    s, y = np.asarray(scores, dtype=float), np.asarray(y).astype(int)
    if rule.startswith("sensitivity:"):
        target = float(rule.split(":", 1)[1])
        if not 0 < target <= 1:  # 0 keeps no positive bag ([patients] threshold refuses it)
            raise ValueError(f"sensitivity must be in (0, 1], got {target}")
        pos = np.sort(s[y == 1])[::-1]
        if not len(pos):
            return 0.5
        keep = pos[max(1, math.ceil(target * len(pos) - 1e-9)) - 1]
        below = s[s < keep]
        return float((keep + below.max()) / 2 if len(below) else keep - 1e-9)
    if rule != "youden":
        raise ValueError(f"unknown threshold rule '{rule}'")
    if len(np.unique(y)) < 2:
        return 0.5
    u = np.unique(s)
    cuts = np.concatenate([[u[0] - 1e-9], (u[:-1] + u[1:]) / 2, [u[-1] + 1e-9]])
    pos, neg = y == 1, y == 0
    best, best_j = 0.5, -np.inf
    for t in cuts:
        j = np.mean(s[pos] >= t) + np.mean(s[neg] < t) - 1
        if j > best_j + 1e-12 or (abs(j - best_j) <= 1e-12 and abs(t - 0.5) < abs(best - 0.5)):
            best, best_j = float(t), j
    return best


#: the decisions a bag can get besides its positive and negative class
REFER = "refer"  # no confident call (too few cells, shifted cells, score in the refer band)
#: why a bag is referred: each ``reason`` of :data:`REFER` starts with one of these
TOO_FEW, SHIFTED, IN_BAND = "too few cells", "cells unlike the training cells", "score in the band"
REFER_KINDS = (TOO_FEW, SHIFTED, IN_BAND)
NO_CALL = "none"  # no readable cell at all
#: ``[patients] min_cells = "auto"``: this percentile of the training bags' cell counts
MIN_CELLS_PERCENTILE = 5


def min_cells_from_counts(counts) -> int:
    """The ``"auto"`` minimum of cells for a confident call: the
    :data:`MIN_CELLS_PERCENTILE`-th percentile of the training bags' cell counts (rounded
    down, at least 1): fewer cells than nearly every bag the threshold was chosen on."""
    counts = np.asarray(list(counts), dtype=float)
    if not len(counts):
        return 1
    return max(1, int(math.floor(np.percentile(counts, MIN_CELLS_PERCENTILE))))


def _holds_patients(band) -> bool:
    """Whether a stored band refers anyone: one drawn with ``[patients] refer_rate`` records
    how many out-of-fold patients it held (none: no band, not a band at the threshold)."""
    extra = getattr(band, "model_extra", None) or {}
    return extra.get("n_inside", 1) != 0


def bag_decision(
    score: float,
    n_cells: int,
    positive: str,
    negative: str,
    threshold: float,
    min_cells: int,
    band=None,
    shifted: bool = False,
) -> tuple[str, str]:
    """``(decision, reason)`` of a bag with ``n_cells`` readable cells and aggregated
    ``score``: :data:`NO_CALL` without cells; :data:`REFER` below ``min_cells``, when its
    cells look unlike the training cells (``shifted``), or when the score lies in the
    stored ``band`` where out-of-fold patients were misclassified (its ``lo`` and ``hi``:
    :class:`ensembles.record.Band`; the reason says which way the score leans); else the
    positive class when
    ``score >= threshold`` and the negative one otherwise (reason empty)."""
    if n_cells == 0:
        return NO_CALL, "no readable image"
    call = positive if score >= threshold else negative
    if n_cells < min_cells:
        return REFER, f"{TOO_FEW} ({n_cells} < min_cells {min_cells}); leaning {call}"
    if shifted:
        return REFER, f"{SHIFTED} (shift score); leaning {call}"
    if band and _holds_patients(band) and band.lo <= score <= band.hi:
        return REFER, (
            f"{IN_BAND} {band.lo:.3f}-{band.hi:.3f} where "
            f"out-of-fold patients were misclassified; leaning {call}"
        )
    return call, ""


def bag_score(spec, p_positive, type_proba=None) -> float:
    """A bag's score under a saved bag task ``spec`` from its cells' positive-class
    probabilities and, for a task that reads cell types (``spec.cells == "typed"`` or the
    ``type_model`` aggregator), their type probabilities (``spec.cell_types.types``
    columns; the model's or the analyser's); NaN without cells."""
    p = np.asarray(p_positive, dtype=float)
    if not len(p):
        return math.nan
    stage = getattr(spec, "cell_types", None)
    if stage is not None and type_proba is None:
        raise ValueError("this bag task reads cell types: give each cell's type probabilities")
    if spec.aggregator == TypeModelAggregator.name:
        return float(stage.type_model_.proba(type_profile(type_proba, p)[None])[0, 1])
    if getattr(spec, "cells", "all") == "typed":
        index = [stage.types.index(t) for t in stage.disease]
        p = p[typed_cells(disease_probability(type_proba, index), stage.cut)]
    return make_aggregator(spec.aggregator, spec.params).score_bag(p)


def call_bag(spec, classes, p_positive, shift=None, type_proba=None) -> tuple[float, str, str]:
    """``(score, decision, reason)`` of one bag under a saved bag task ``spec``
    (:class:`ensembles.record.BagTask`: its ``positive`` class, ``aggregator`` and
    ``params``, ``threshold``, ``min_cells`` and ``refer_band``), from the positive-class
    probabilities of the bag's readable cells (the score is NaN without cells; see
    :func:`bag_score` for ``type_proba``) and, optionally, their shift scores
    (:mod:`core.shift`; the bag is referred when its batch is flagged)."""
    p = np.asarray(p_positive, dtype=float)
    score = bag_score(spec, p, type_proba)
    shifted = (
        shift is not None and len(shift) > 0 and ShiftReference.batch_summary(shift)["flagged"]
    )
    decision, reason = bag_decision(
        score,
        len(p),
        spec.positive,
        negative_label([str(c) for c in classes], spec.positive),
        float(spec.threshold),
        int(spec.min_cells),
        spec.refer_band,
        bool(shifted),
    )
    return score, decision, reason


def call_bags(
    spec, classes, groups, p_positive, labels=None, skipped_groups=(), shift=None, type_proba=None
) -> list[dict]:
    """:func:`call_bag` for every group (bag) of a set of scored cells, in order of first
    appearance: ``groups`` the group of each readable cell, ``p_positive`` its
    positive-class probability, ``labels`` (optional) its label (the bag's label is its
    cells' most frequent one), ``skipped_groups`` the group of each unreadable cell (a
    group with no readable cell still gets a row, decision ``none``), ``shift`` (optional)
    each readable cell's shift score, ``type_proba`` (a task that reads cell types) each
    readable cell's type probabilities. Rows: ``bag``,
    ``n_cells``, ``n_skipped``, ``probability``, ``decision``, ``reason``, ``leaning`` (the
    call at the threshold alone, referred or not; None without cells) and ``label``."""
    p = np.asarray(p_positive, dtype=float)
    cells: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        cells.setdefault(str(g), []).append(i)
    skipped = Counter(str(g) for g in skipped_groups)
    rows = []
    for g in dict.fromkeys([*cells, *skipped]):
        idx = cells.get(g, [])
        score, decision, reason = call_bag(
            spec,
            classes,
            p[idx],
            None if shift is None else np.asarray(shift)[idx],
            None if type_proba is None else np.asarray(type_proba)[idx],
        )
        label = (
            Counter(str(labels[i]) for i in idx).most_common(1)[0][0]
            if labels is not None and idx
            else None
        )
        leaning = (
            None
            if not idx
            else (
                spec.positive
                if score >= float(spec.threshold)
                else negative_label([str(c) for c in classes], spec.positive)
            )
        )
        rows.append(
            {
                "bag": g,
                "n_cells": len(idx),
                "n_skipped": skipped[g],
                "probability": score,
                "decision": decision,
                "reason": reason,
                "leaning": leaning,
                "label": label,
            }
        )
    return rows


__all__ = [
    "MeanAggregator",
    "TrimmedMeanAggregator",
    "TopKMeanAggregator",
    "CompositionAggregator",
    "TypeModelAggregator",
    "AGGREGATORS",
    "CELL_AGGREGATORS",
    "CARRIED_AGGREGATORS",
    "bag_score",
    "aggregators_needing",
    "DEFAULT_AGGREGATORS",
    "make_aggregator",
    "choose_threshold",
    "negative_label",
    "REFER",
    "REFER_KINDS",
    "NO_CALL",
    "min_cells_from_counts",
    "bag_decision",
    "call_bag",
    "call_bags",
]
