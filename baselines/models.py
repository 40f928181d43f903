"""Candidates that classify hand-crafted features with scikit-learn pipelines.

Every step that learns from data (imputation, scaling, PCA) sits inside the pipeline, so
it is fitted on the training rows of a fold only. Fitted pipelines are saved with skops
and loaded against an explicit allow-list of types (no pickle); XGBoost boosters are
saved in XGBoost's own JSON format.

=====================  ==========================================================
type                   pipeline
=====================  ==========================================================
``feature_forest``     impute (median) -> random forest
``feature_svm``        impute -> standardise -> [PCA] -> SVC (RBF) or LinearSVC,
                       probabilities by sigmoid calibration on internal CV folds
``feature_xgb``        impute -> [PCA] -> XGBoost (``tree_method="hist"``)
=====================  ==========================================================
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import skops.io as sio
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.ensemble import RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.class_weight import compute_sample_weight

from core.candidate import Candidate
from core.errors import BenchError
from core.registry import register
from features import extract_central

MODEL_FILE = "model.skops"
XGB_FILE = "xgb.json"
XGB_META = "xgb_meta.json"
# Types skops does not trust by default that our pipelines are made of (each checked by
# dumping and listing get_untrusted_types of a fitted pipeline of that kind).
SAFE_TYPES = {
    "numpy.dtype",
    "sklearn.tree._tree.Tree",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
}


def _pca_step(pca, n_rows: int, n_cols: int, random_state):
    """A PCA step for ``pca`` (``None``/0: none; float in (0, 1): variance kept; int: components)."""
    if not pca:
        return []
    if isinstance(pca, float) and 0 < pca < 1:
        n = pca
    else:
        n = int(pca)
        if n < 1:
            raise BenchError(
                f"pca must be a fraction in (0, 1) or a number of components, got {pca!r}"
            )
        n = min(n, n_rows, n_cols)
    return [("pca", PCA(n_components=n, svd_solver="full", random_state=random_state))]


#: parameter rules shared by every feature model (see core.params)
FEATURE_RULES = {
    "features": {"type": dict, "none": True},
    "random_state": {"ge": 0},
    "n_jobs": {"type": int, "none": True},
    "crop": {"gt": 0, "le": 1},
}


class FeatureClassifier(Candidate):
    """Base: features of ``self.features`` -> impute -> ``self._make_steps(...)`` pipeline.

    Every subclass takes ``crop``: the fraction of each image side kept around the centre
    before the features are extracted (1: the whole image; :func:`core.images.center_crop`,
    the same window as the CNNs' ``crop``). Analysers centre the cell; colour and texture
    of the whole frame mostly describe the lab's red cells and background.

    Subclasses implement ``_make_steps(n_rows, n_cols)`` (the steps after imputation) and
    may override ``_fit_pipeline`` and the save/load pair.
    """

    kind = "baseline"
    fit_accepts = frozenset({"classes"})
    needs_prepare = True  # features of all images extracted once, before the units
    tunable = True

    def _make_steps(self, n_rows: int, n_cols: int) -> list:  # pragma: no cover - interface
        raise NotImplementedError

    def features_of(self, X, progress: bool = False) -> np.ndarray:
        """The (N, D) features this candidate reads of images ``X``: its feature set of
        the central ``crop`` (:func:`features.extract_central`). Public: a saved
        predictor's lab head reads the cells' features through it (:mod:`core.labhead`)."""
        if not self.features:
            raise BenchError(
                f"candidate type '{self.type_name}' needs params.features "
                "(a [feature_sets] name or table)"
            )
        return extract_central(X, self.features, self.crop, progress=progress)

    _features = features_of

    def prepare(self, X_all) -> None:
        """Extract (and cache on disk) the features of every image once, before the folds."""
        self._features(np.asarray(X_all), progress=True)

    def _fit_pipeline(self, pipe: Pipeline, F: np.ndarray, y: np.ndarray) -> None:
        pipe.fit(F, y)

    def fit(self, X, y, X_val=None, y_val=None, classes=None):
        self._set_classes(y, classes)
        F = self._features(X)
        yi = np.searchsorted(self.classes_, y)
        self.pipeline_ = Pipeline(
            [("impute", SimpleImputer(strategy="median", keep_empty_features=True))]
            + self._make_steps(*F.shape)
        )
        self._fit_pipeline(self.pipeline_, F, yi)
        self.n_features_ = F.shape[1]
        return self

    def _model_classes(self) -> np.ndarray:
        """Column ``j`` of the pipeline's ``predict_proba`` is class index ``[j]``."""
        return np.asarray(self.pipeline_.classes_)

    def check_loaded(self, n_classes: int, image_size: int) -> None:
        """Also the pipeline's classes: indices among the manifest's."""
        super().check_loaded(n_classes, image_size)
        cols = np.asarray(self._model_classes())
        if cols.size and (cols.dtype.kind not in "iu" or cols.min() < 0 or cols.max() >= n_classes):
            raise BenchError(
                f"the model's classes {cols.tolist()} are not among the "
                f"manifest's {n_classes} classes"
            )

    def predict_proba(self, X) -> np.ndarray:
        proba = self.pipeline_.predict_proba(self._features(X))
        out = np.zeros((len(proba), self.n_classes_), dtype=np.float64)
        out[:, self._model_classes()] = proba  # classes missing in training get 0
        return out

    def _save_model(self, path: Path) -> None:
        sio.dump(self.pipeline_, path / MODEL_FILE)

    def _load_model(self, path: Path) -> None:
        self.pipeline_ = _load_skops(path / MODEL_FILE)
        self.n_features_ = self.pipeline_.n_features_in_


def _load_skops(file: Path):
    untrusted = set(sio.get_untrusted_types(file=file))
    if untrusted - SAFE_TYPES:
        raise BenchError(
            f"{file} holds types outside the allow-list: {sorted(untrusted - SAFE_TYPES)}"
        )
    return sio.load(file, trusted=sorted(untrusted))


@register("feature_forest")
class FeatureForest(FeatureClassifier):
    """Random forest on a feature set.

    Parameters
    ----------
    features : dict
        Feature set ``{extractor: params}`` (see :mod:`features`).
    crop : share of the image side kept around the centre (see :class:`FeatureClassifier`).
    n_estimators, max_depth, max_features, min_samples_leaf : forest parameters.
    class_weight : ``None`` or ``"balanced"``.
    n_jobs : threads for the forest.
    random_state : seed.
    """

    param_rules = {
        **FEATURE_RULES,
        "n_estimators": {"ge": 1},
        "max_depth": {"type": int, "ge": 1, "none": True},
        "max_features": {"type": float, "gt": 0, "also": ["sqrt", "log2"], "none": True},
        "min_samples_leaf": {"ge": 1},
        "class_weight": {"choices": ["balanced", "balanced_subsample"], "none": True},
    }

    def __init__(
        self,
        features=None,
        n_estimators=300,
        max_depth=None,
        max_features="sqrt",
        min_samples_leaf=1,
        class_weight="balanced",
        n_jobs=None,
        random_state=0,
        crop=1.0,
    ):
        self.features = features
        self.crop = crop
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.max_features = max_features
        self.min_samples_leaf = min_samples_leaf
        self.class_weight = class_weight
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _make_steps(self, n_rows, n_cols):
        return [
            (
                "model",
                RandomForestClassifier(
                    n_estimators=self.n_estimators,
                    max_depth=self.max_depth,
                    max_features=self.max_features,
                    min_samples_leaf=self.min_samples_leaf,
                    class_weight=self.class_weight,
                    n_jobs=self.n_jobs,
                    random_state=self.random_state,
                ),
            )
        ]

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


@register("feature_lda")
class FeatureLDA(FeatureClassifier):
    """Linear discriminant analysis on standardised features, covariance shrunk by the
    Ledoit-Wolf rule: fast, untuned, and a sound linear classifier on thousands of rows.
    The cell-type stage of a bag task (:mod:`bench.protocols.patients`) uses it.

    Parameters
    ----------
    features : dict
        Feature set ``{extractor: params}``.
    crop : share of the image side kept around the centre (see :class:`FeatureClassifier`).
    """

    param_rules = dict(FEATURE_RULES)
    tunable = False

    def __init__(self, features=None, crop=1.0):
        self.features = features
        self.crop = crop

    def _make_steps(self, n_rows, n_cols):
        return [
            ("scale", StandardScaler()),
            ("model", LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")),
        ]


@register("feature_svm")
class FeatureSVM(FeatureClassifier):
    """Support vector machine on standardised (optionally PCA-reduced) features.

    Probabilities come from sigmoid (Platt) calibration of the decision values on
    ``calibration_cv`` internal folds of the training rows, then one SVM refitted on all of
    them (``CalibratedClassifierCV(ensemble=False)``, the replacement of the deprecated
    ``SVC(probability=True)``).

    Parameters
    ----------
    features : dict
        Feature set ``{extractor: params}``.
    crop : share of the image side kept around the centre (see :class:`FeatureClassifier`).
    kernel : ``"rbf"`` (``SVC``) or ``"linear"`` (``LinearSVC``, fast on many rows).
    C : regularisation (larger: less).
    gamma_factor : RBF width as a multiple of scikit-learn's ``gamma="scale"``,
        ``1 / (n_features * Var(X))`` computed on the (scaled, reduced) training features.
    pca : ``None``/0 (none), a fraction in (0, 1) of variance to keep, or a number of
        components.
    class_weight : ``None`` or ``"balanced"``.
    calibration_cv : internal folds for the probability calibration (>= 2).
    max_iter : iteration cap of ``LinearSVC``.
    random_state : seed (PCA).
    """

    param_rules = {
        **FEATURE_RULES,
        "kernel": {"choices": ["rbf", "linear"]},
        "C": {"gt": 0},
        "gamma_factor": {"gt": 0},
        "pca": {"type": float, "gt": 0, "none": True},
        "class_weight": {"choices": ["balanced"], "none": True},
        "calibration_cv": {"ge": 2},
        "max_iter": {"ge": 1},
    }

    def __init__(
        self,
        features=None,
        kernel="rbf",
        C=1.0,
        gamma_factor=1.0,
        pca=None,
        class_weight="balanced",
        calibration_cv=3,
        max_iter=5000,
        random_state=0,
        crop=1.0,
    ):
        self.features = features
        self.crop = crop
        self.kernel = kernel
        self.C = C
        self.gamma_factor = gamma_factor
        self.pca = pca
        self.class_weight = class_weight
        self.calibration_cv = calibration_cv
        self.max_iter = max_iter
        self.random_state = random_state

    def _make_steps(self, n_rows, n_cols):
        if self.kernel == "rbf":
            svm = SVC(
                kernel="rbf", C=self.C, gamma=1.0, class_weight=self.class_weight, cache_size=500
            )
        elif self.kernel == "linear":
            svm = LinearSVC(
                C=self.C,
                class_weight=self.class_weight,
                max_iter=self.max_iter,
                random_state=self.random_state,
            )
        else:
            raise BenchError(f"feature_svm kernel must be 'rbf' or 'linear', got {self.kernel!r}")
        return (
            [("scale", StandardScaler())]
            + _pca_step(self.pca, n_rows, n_cols, self.random_state)
            + [
                (
                    "model",
                    CalibratedClassifierCV(
                        svm, method="sigmoid", cv=int(self.calibration_cv), ensemble=False
                    ),
                )
            ]
        )

    def _fit_pipeline(self, pipe, F, y):
        Z = pipe[:-1].fit_transform(F, y)  # impute, scale, PCA: fitted on these rows only
        if self.kernel == "rbf":
            var = float(Z.var())
            gamma = self.gamma_factor / (Z.shape[1] * var) if var > 0 else self.gamma_factor
            pipe[-1].set_params(estimator__gamma=gamma)
        cv = int(self.calibration_cv)
        counts = np.bincount(y)
        if counts[counts > 0].min() < cv:  # too few rows of a class for the internal folds
            raise BenchError(
                f"feature_svm: calibration_cv={cv} needs at least {cv} training "
                f"rows per class; the smallest class has {counts[counts > 0].min()}"
            )
        pipe[-1].fit(Z, y)

    @classmethod
    def param_space(cls, trial) -> dict:
        return {
            "C": trial.suggest_float("C", 1e-2, 1e2, log=True),
            "gamma_factor": trial.suggest_float("gamma_factor", 0.05, 5.0, log=True),
        }

    def model_size(self):
        est = self.pipeline_[-1].calibrated_classifiers_[0].estimator
        if hasattr(est, "support_vectors_"):
            return int(est.support_vectors_.size)
        return int(est.coef_.size + est.intercept_.size)


def _threads(n_jobs):
    """``n_jobs``, else the process's OpenMP share (``$OMP_NUM_THREADS``, which a
    benchmark worker sets to its share of the cores), else ``None``. XGBoost's own
    default is every core of the machine, whatever OpenMP's setting: two workers would
    each run as many threads as there are cores."""
    if n_jobs is not None:
        return n_jobs
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


@register("feature_xgb")
class FeatureXGB(FeatureClassifier):
    fit_accepts = frozenset({"classes", "epoch_callbacks"})

    """Gradient-boosted trees (XGBoost, ``tree_method="hist"``) on a feature set.

    Parameters
    ----------
    features : dict
        Feature set ``{extractor: params}``.
    crop : share of the image side kept around the centre (see :class:`FeatureClassifier`).
    n_estimators, max_depth, learning_rate, subsample, colsample_bytree, min_child_weight,
    reg_lambda : XGBoost parameters.
    class_weight : ``None`` or ``"balanced"`` (sample weights inversely proportional to the
        class frequency).
    pca : as in :class:`FeatureSVM` (usually not needed for trees).
    report_every : with ``epoch_callbacks`` and a validation split, report validation
        accuracy every this many boosting rounds (for Optuna pruning).
    n_jobs : threads (``None``: ``$OMP_NUM_THREADS`` when set, else every core).
    random_state : seed.
    """

    param_rules = {
        **FEATURE_RULES,
        "n_estimators": {"ge": 1},
        "max_depth": {"ge": 1},
        "learning_rate": {"gt": 0, "le": 1},
        "subsample": {"gt": 0, "le": 1},
        "colsample_bytree": {"gt": 0, "le": 1},
        "min_child_weight": {"ge": 0},
        "reg_lambda": {"ge": 0},
        "class_weight": {"choices": ["balanced"], "none": True},
        "pca": {"type": float, "gt": 0, "none": True},
        "report_every": {"ge": 1},
    }

    def __init__(
        self,
        features=None,
        n_estimators=300,
        max_depth=6,
        learning_rate=0.1,
        subsample=0.8,
        colsample_bytree=0.5,
        min_child_weight=1.0,
        reg_lambda=1.0,
        class_weight="balanced",
        pca=None,
        report_every=25,
        n_jobs=None,
        random_state=0,
        crop=1.0,
    ):
        self.features = features
        self.crop = crop
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.min_child_weight = min_child_weight
        self.reg_lambda = reg_lambda
        self.class_weight = class_weight
        self.pca = pca
        self.report_every = report_every
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _booster(self, callbacks=None):
        from xgboost import XGBClassifier

        return XGBClassifier(
            n_estimators=self.n_estimators,
            max_depth=self.max_depth,
            learning_rate=self.learning_rate,
            subsample=self.subsample,
            colsample_bytree=self.colsample_bytree,
            min_child_weight=self.min_child_weight,
            reg_lambda=self.reg_lambda,
            tree_method="hist",
            n_jobs=_threads(self.n_jobs),
            random_state=self.random_state,
            eval_metric="merror",
            callbacks=callbacks,
        )

    def _make_steps(self, n_rows, n_cols):
        return _pca_step(self.pca, n_rows, n_cols, self.random_state) + [("model", self._booster())]

    def fit(self, X, y, X_val=None, y_val=None, classes=None, epoch_callbacks=None):
        self._set_classes(y, classes)
        F = self._features(X)
        yi = np.searchsorted(self.classes_, y)
        self.present_ = np.unique(yi)  # XGBoost needs labels 0..k-1
        yk = np.searchsorted(self.present_, yi)
        steps = [("impute", SimpleImputer(strategy="median", keep_empty_features=True))]
        steps += self._make_steps(*F.shape)
        self.pipeline_ = Pipeline(steps)
        Z = self.pipeline_[:-1].fit_transform(F, yk)
        kw = {"verbose": False}
        if self.class_weight == "balanced":
            kw["sample_weight"] = compute_sample_weight("balanced", yk)
        elif self.class_weight is not None:
            raise BenchError(
                f"feature_xgb class_weight must be None or 'balanced', got {self.class_weight!r}"
            )
        if epoch_callbacks and X_val is not None:
            yv = np.searchsorted(self.classes_, y_val)
            keep = np.isin(yv, self.present_)
            Zv = self.pipeline_[:-1].transform(self._features(np.asarray(X_val)))[keep]
            kw["eval_set"] = [(Zv, np.searchsorted(self.present_, yv[keep]))]
            self.pipeline_.steps[-1] = (
                "model",
                self._booster([_xgb_reporter(epoch_callbacks, int(self.report_every))]),
            )
        self.pipeline_[-1].fit(Z, yk, **kw)
        self.pipeline_[-1].set_params(callbacks=None)  # callbacks are not part of the model
        self.n_features_ = F.shape[1]
        return self

    def _model_classes(self):
        return self.present_

    @classmethod
    def param_space(cls, trial) -> dict:
        return {
            "n_estimators": trial.suggest_int("n_estimators", 100, 400, step=100),
            "max_depth": trial.suggest_int("max_depth", 3, 8),
            "learning_rate": trial.suggest_float("learning_rate", 0.02, 0.3, log=True),
            "subsample": trial.suggest_float("subsample", 0.5, 1.0),
            "colsample_bytree": trial.suggest_float("colsample_bytree", 0.2, 1.0),
            "min_child_weight": trial.suggest_float("min_child_weight", 0.5, 10.0, log=True),
            "reg_lambda": trial.suggest_float("reg_lambda", 0.1, 10.0, log=True),
        }

    def _save_model(self, path):
        sio.dump(self.pipeline_[:-1], path / MODEL_FILE)  # impute [+ PCA]
        self.pipeline_[-1].save_model(path / XGB_FILE)  # XGBoost's JSON
        (path / XGB_META).write_text(json.dumps({"present": self.present_.tolist()}))

    def _load_model(self, path):
        from xgboost import XGBClassifier

        pre = _load_skops(path / MODEL_FILE)
        booster = XGBClassifier()
        booster.load_model(path / XGB_FILE)
        self.present_ = np.asarray(json.loads((path / XGB_META).read_text())["present"])
        self.pipeline_ = Pipeline(list(pre.steps) + [("model", booster)])
        self.n_features_ = pre.n_features_in_

    def model_size(self):
        return int(self.pipeline_[-1].get_booster().trees_to_dataframe().shape[0])


def _xgb_reporter(fns, every: int):
    """An XGBoost callback that calls ``fn(round, {"val_accuracy": ...})`` every ``every`` rounds."""
    from xgboost.callback import TrainingCallback

    class Reporter(TrainingCallback):
        def after_iteration(self, model, epoch, evals_log):
            if (epoch + 1) % max(1, every):
                return False
            err = next(iter(evals_log.values()), {}).get("merror")
            if err:
                for fn in fns:
                    fn(epoch, {"val_accuracy": 1.0 - float(err[-1])})
            return False

    return Reporter()
