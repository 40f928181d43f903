"""The one interface every benchmark candidate speaks.

A candidate is a scikit-learn style estimator on **images**: hyper-parameters are
``__init__`` arguments stored unchanged, fitted state ends with an underscore.

* ``fit(X, y, X_val=None, y_val=None)``: ``X`` is ``uint8`` (N, H, W, 3), ``y`` int labels.
  ``X_val``/``y_val`` are an optional validation split carved from the training rows
  (never from the evaluated fold), used for early stopping and pruning.
* ``predict_proba(X)`` returns (N, n_classes) probabilities in ``classes_`` order.
* ``param_space(trial)`` (class method) returns parameters sampled from an Optuna trial.
* ``save(path)`` / ``load(path)`` persist a fitted candidate without pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from bench import registry
from bench.errors import BenchError
from bench.io import atomic_write_json

CANDIDATE_FILE = "candidate.json"


class Candidate(ClassifierMixin, BaseEstimator):
    """Base class of all candidates (see module docstring)."""

    kind = "baseline"      # "baseline" or "cnn"
    type_name = None       # set by the registry

    # -- to implement -------------------------------------------------------------
    def fit(self, X, y, X_val=None, y_val=None):  # pragma: no cover - interface
        raise NotImplementedError

    def predict_proba(self, X) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def param_space(cls, trial) -> dict:
        """Parameters to try, sampled from an ``optuna.Trial``. Default: nothing to tune."""
        return {}

    def _save_model(self, path: Path) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _load_model(self, path: Path) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------
    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def _set_classes(self, y, classes=None) -> None:
        self.classes_ = np.asarray(classes if classes is not None else np.unique(y))
        self.n_classes_ = len(self.classes_)

    def model_size(self) -> int | None:
        """Number of trainable parameters or stored model values, if known."""
        return None

    def save(self, path) -> None:
        """Write the fitted candidate into the folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._save_model(path)
        atomic_write_json(path / CANDIDATE_FILE, {
            "type": self.type_name, "kind": self.kind, "params": self.get_params(deep=False),
            "classes": self.classes_.tolist(),
        })

    @classmethod
    def load(cls, path) -> "Candidate":
        path = Path(path)
        meta = json.loads((path / CANDIDATE_FILE).read_text())
        obj = cls(**meta["params"])
        obj._set_classes(None, np.asarray(meta["classes"]))
        obj._load_model(path)
        return obj


def load_candidate(path) -> Candidate:
    """Load a saved candidate of any registered type (no arbitrary code is imported)."""
    path = Path(path)
    meta_path = path / CANDIDATE_FILE
    if not meta_path.is_file():
        raise BenchError(f"not a saved candidate (no {CANDIDATE_FILE}): {path}")
    meta = json.loads(meta_path.read_text())
    return registry.get(meta["type"]).load(path)


def build_candidate(entry: dict) -> Candidate:
    """Instantiate a candidate from a resolved config entry (``type`` + ``params``)."""
    cls = registry.get(entry["type"])
    try:
        return cls(**entry.get("params", {}))
    except TypeError as exc:
        raise BenchError(f"candidate type '{entry['type']}': bad params ({exc})") from None
