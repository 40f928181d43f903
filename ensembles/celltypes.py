"""The cell-type stage of a bag task: which of a patient's cells carry the diagnosis.

A patient's smear holds many cells that say little about the diagnosis (lymphocytes,
neutrophils) and carry the hospital and the day instead; the diagnosis sits in a few cell
types (APL: promyelocytes and blasts). A cell-type model, trained in the same run on the
cells' types (``[data] cell_types``) and the same patient folds, gives every cell a
probability of each type; from it:

* :func:`typed_cells`: the cells likely of a diagnostic type (``[data] disease_cells``),
  over which any cell aggregator scores the bag (the ``[typed cells]`` rows);
* :func:`type_profile` and :class:`ensembles.bags.TypeModelAggregator`: a patient-level logistic
  regression on each patient's type composition and per-type mean of the cells' positive
  probabilities, fitted on training patients only.

The cell-type model is a candidate (``feature_lda``: shrinkage LDA on a feature set), saved
and loaded as the members are; the type model is linear, stored as plain arrays
(:class:`LinearModel`, ``.npz`` without pickles). When the analyser's own types are known at prediction time they replace
the model's (:func:`one_hot_types`).
"""

from __future__ import annotations

import io
import re

import numpy as np

#: a cell counts as diagnostic when its probability of a ``disease_cells`` type reaches this
TYPED_CUT = 0.5


class LinearModel:
    """A fitted linear classifier as arrays: median imputation, standardisation, then
    softmax (several classes) or sigmoid (two) of ``x @ coef.T + intercept``. Columns of
    :meth:`proba` follow ``n_classes`` (classes the fit never saw get probability 0)."""

    def __init__(self, median, mean, scale, coef, intercept, classes, n_classes: int):
        self.median = np.asarray(median, dtype=np.float64)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.coef = np.atleast_2d(np.asarray(coef, dtype=np.float64))
        self.intercept = np.atleast_1d(np.asarray(intercept, dtype=np.float64))
        self.classes = np.asarray(classes, dtype=np.int64)
        self.n_classes = int(n_classes)

    @classmethod
    def from_pipeline(cls, pipe, n_classes: int) -> "LinearModel":
        """From a fitted ``[SimpleImputer ->] StandardScaler -> LDA or LogisticRegression``."""
        *first, sc, clf = (step for _, step in pipe.steps)
        median = first[0].statistics_ if first else np.zeros_like(sc.mean_)
        return cls(median, sc.mean_, sc.scale_, clf.coef_, clf.intercept_, clf.classes_, n_classes)

    def decision(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        X = np.where(np.isnan(X), self.median, X)
        return ((X - self.mean) / self.scale) @ self.coef.T + self.intercept

    def proba(self, X) -> np.ndarray:
        z = self.decision(X)
        out = np.zeros((len(z), self.n_classes))
        if len(self.classes) == 2 and z.shape[1] == 1:  # binary: one logit
            p = 1.0 / (1.0 + np.exp(-z[:, 0]))
            out[:, self.classes[0]], out[:, self.classes[1]] = 1 - p, p
            return out
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        out[:, self.classes] = e / e.sum(1, keepdims=True)
        return out

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            median=self.median,
            mean=self.mean,
            scale=self.scale,
            coef=self.coef,
            intercept=self.intercept,
            classes=self.classes,
            n_classes=np.array(self.n_classes),
        )
        return buf.getvalue()

    @classmethod
    def from_file(cls, path) -> "LinearModel":
        with np.load(path, allow_pickle=False) as z:
            return cls(
                **{k: z[k] for k in z.files if k != "n_classes"}, n_classes=int(z["n_classes"])
            )


def disease_probability(type_proba: np.ndarray, disease_index) -> np.ndarray:
    """Each cell's probability of being of a diagnostic type (the sum over those types)."""
    return np.asarray(type_proba)[:, list(disease_index)].sum(1)


def typed_cells(p_disease: np.ndarray, cut: float = TYPED_CUT) -> np.ndarray:
    """Indices of a bag's cells likely of a diagnostic type (``p_disease >= cut``); every
    cell when none is, so a bag without such cells is scored on all of them."""
    idx = np.flatnonzero(np.asarray(p_disease) >= cut)
    return idx if len(idx) else np.arange(len(p_disease))


def type_profile(type_proba: np.ndarray, p_positive: np.ndarray) -> np.ndarray:
    """A bag's features for :class:`ensembles.bags.TypeModelAggregator`: its type composition (the mean
    type probability of its cells), the mean positive probability of each type's cells
    (weighted by the type probability; the bag's mean where a type is absent) and the
    bag's mean positive probability."""
    T, p = np.asarray(type_proba, dtype=float), np.asarray(p_positive, dtype=float)
    mean = float(p.mean()) if len(p) else 0.0
    if not len(p):
        return np.concatenate([np.zeros(T.shape[1]), np.full(T.shape[1], mean), [mean]])
    w = T.sum(0)
    per_type = np.where(w > 1e-6, (T * p[:, None]).sum(0) / np.maximum(w, 1e-12), mean)
    return np.concatenate([T.mean(0), per_type, [mean]])


def type_name(text: str) -> str:
    """A cell type's name as the runs write it: lower case, runs of other characters as one
    underscore (the analyser's folder ``Blast, no lineage spec`` is
    ``blast_no_lineage_spec``)."""
    return re.sub(r"[^0-9a-z]+", "_", str(text).strip().lower()).strip("_")


def one_hot_types(names, types: list[str]) -> np.ndarray:
    """Type probabilities from given types (the analyser's): one-hot over ``types``; a
    cell of another type (or none) gets a zero row."""
    index = {t: i for i, t in enumerate(types)}
    out = np.zeros((len(names), len(types)))
    for i, n in enumerate(names):
        j = index.get(type_name(n)) if n else None
        if j is not None:
            out[i, j] = 1.0
    return out


__all__ = [
    "TYPED_CUT",
    "LinearModel",
    "disease_probability",
    "typed_cells",
    "type_profile",
    "type_name",
    "one_hot_types",
]
