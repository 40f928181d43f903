"""Candidates that classify hand-crafted features with scikit-learn pipelines.

Every step that learns from data (imputation, scaling, PCA) sits inside the pipeline, so
it is fitted on the training rows of a fold only. Fitted pipelines are saved with skops
and loaded against an explicit allow-list of types (no pickle).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skops.io as sio
from sklearn.ensemble import RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline

from bench.candidate import Candidate
from bench.errors import BenchError
from bench.registry import register
from features import extract

MODEL_FILE = "model.skops"
# Types skops does not trust by default that our pipelines are made of.
SAFE_TYPES = {"numpy.dtype", "sklearn.tree._tree.Tree"}


class FeatureClassifier(Candidate):
    """Base: features of ``self.features`` -> ``self._make_estimator()`` pipeline."""

    kind = "baseline"

    def _make_steps(self) -> list:  # pragma: no cover - interface
        raise NotImplementedError

    def _features(self, X) -> np.ndarray:
        return extract(X, self.features, progress=False)

    def fit(self, X, y, X_val=None, y_val=None, classes=None):
        self._set_classes(y, classes)
        F = self._features(X)
        self.pipeline_ = Pipeline([("impute", SimpleImputer(strategy="median",
                                                            keep_empty_features=True))]
                                  + self._make_steps())
        self.pipeline_.fit(F, np.searchsorted(self.classes_, y))
        self.n_features_ = F.shape[1]
        return self

    def predict_proba(self, X) -> np.ndarray:
        proba = self.pipeline_.predict_proba(self._features(X))
        out = np.zeros((len(proba), self.n_classes_), dtype=np.float64)
        out[:, self.pipeline_.classes_] = proba   # classes missing in training get 0
        return out

    def _save_model(self, path: Path) -> None:
        sio.dump(self.pipeline_, path / MODEL_FILE)

    def _load_model(self, path: Path) -> None:
        file = path / MODEL_FILE
        untrusted = set(sio.get_untrusted_types(file=file))
        if untrusted - SAFE_TYPES:
            raise BenchError(f"{file} holds types outside the allow-list: "
                             f"{sorted(untrusted - SAFE_TYPES)}")
        self.pipeline_ = sio.load(file, trusted=sorted(untrusted))
        self.n_features_ = self.pipeline_.n_features_in_


@register("feature_forest")
class FeatureForest(FeatureClassifier):
    """Random forest on a feature set.

    Parameters
    ----------
    features : dict
        Feature set ``{extractor: params}`` (see :mod:`features`).
    n_estimators, max_depth, max_features, min_samples_leaf : forest parameters.
    class_weight : ``None`` or ``"balanced"``.
    n_jobs : threads for the forest.
    random_state : seed.
    """

    def __init__(self, features=None, n_estimators=300, max_depth=None, max_features="sqrt",
                 min_samples_leaf=1, class_weight="balanced", n_jobs=None, random_state=0):
        self.features = features
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.max_features = max_features
        self.min_samples_leaf = min_samples_leaf
        self.class_weight = class_weight
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _make_steps(self):
        return [("model", RandomForestClassifier(
            n_estimators=self.n_estimators, max_depth=self.max_depth,
            max_features=self.max_features, min_samples_leaf=self.min_samples_leaf,
            class_weight=self.class_weight, n_jobs=self.n_jobs, random_state=self.random_state))]

    @classmethod
    def param_space(cls, trial) -> dict:
        return {
            "n_estimators": trial.suggest_int("n_estimators", 100, 600, step=100),
            "max_depth": trial.suggest_categorical("max_depth", [None, 12, 24]),
            "max_features": trial.suggest_categorical("max_features", ["sqrt", "log2"]),
            "min_samples_leaf": trial.suggest_int("min_samples_leaf", 1, 4),
        }

    def model_size(self):
        return int(sum(t.tree_.node_count for t in self.pipeline_[-1].estimators_))
