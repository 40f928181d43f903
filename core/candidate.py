"""The one interface every benchmark candidate speaks, and the capabilities it declares.

A candidate is a scikit-learn style estimator on **images**: hyper-parameters are
``__init__`` arguments stored unchanged, fitted state ends with an underscore.

The contract (all a plugin must write):

* ``fit(X, y, X_val=None, y_val=None)``: ``X`` is ``uint8`` (N, H, W, 3), ``y`` int labels.
  ``X_val``/``y_val`` are an optional validation split carved from the training rows
  (never from the evaluated fold), used for early stopping and pruning. Call
  ``self._set_classes(y)`` to set ``classes_``.
* ``predict_proba(X)`` returns (N, len(classes_)) probabilities in ``classes_`` order.
* ``_save_model(path)`` / ``_load_model(path)`` persist the fitted state in a folder
  without pickle.
* optional: ``param_space(trial)`` (class method, with ``tunable = True``) returns
  parameters sampled from an Optuna trial.

Capabilities are **declared** as class attributes, never sniffed; the runner, the tuner,
the predictor and the report ask them:

``fit_accepts``
    optional keywords ``fit`` takes beyond the contract: ``"classes"`` (all class labels,
    so that a model trained on a fold lacking a class still has its column),
    ``"workdir"`` (a folder for checkpoints and logs) and ``"epoch_callbacks"``
    (``callback(epoch, logs)`` after each epoch: the candidate reports epochs and its
    tuning trials can be pruned) and ``"soft_targets"`` (an ``(n, n_classes)`` array of
    class probabilities, one row per training row, in the order of ``classes``: the model
    learns them instead of the hard labels, which still stratify its validation split;
    ``bench distill`` trains a student this way). Use :func:`fit_candidate` to call ``fit``.
``tunable``
    ``param_space`` samples a search space.
``needs_prepare``
    ``prepare(X_all)`` computes something once for all images (features, embeddings),
    without labels, before the work units run; ``prepare_in_child`` asks for a separate
    process (TensorFlow keeps a forward pass's memory for the life of a process).
``explainable``
    ``explain(X, class_index)`` returns Grad-CAM-style maps (N, H, W) in [0, 1], and
    ``randomized(seed)`` the same model with re-initialised weights (the sanity check).
``fused_inference``
    ``inference_parts()`` returns ``(key, trunk, head)`` Keras pieces the predictor runs
    in one graph; fold models with equal ``key`` share one trunk pass.
``adaptable``
    ``adapt(X)`` re-estimates statistics the model learned from its training images
    (batch norm) on unlabelled new images, for test-time adaptation; returns how many
    layers changed.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from core import registry
from core.errors import BenchError
from core.io import atomic_write_json

CANDIDATE_FILE = "candidate.json"
FIT_EXTRAS = frozenset({"classes", "workdir", "epoch_callbacks", "soft_targets"})


class Candidate(ClassifierMixin, BaseEstimator):
    """Base class of all candidates (see module docstring)."""

    kind = "baseline"  # "baseline" or "cnn"
    type_name = None  # set by the registry

    # -- declared capabilities (see the module docstring) ---------------------------
    fit_accepts: frozenset = frozenset()
    tunable = False
    needs_prepare = False
    prepare_in_child = False
    explainable = False
    fused_inference = False
    adaptable = False

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

    def fit_notes(self) -> list[str]:
        """What a user must know about this fit (e.g. a backbone that started from random
        weights because its weights file was missing); recorded with each work unit and
        shown as a report warning. None by default."""
        return []

    def check_loaded(self, n_classes: int, image_size: int) -> None:
        """Raise (one line) when this loaded model cannot give ``n_classes`` probabilities
        for images of side ``image_size``; the predictor asks every fold model it loads.
        Candidates with more to check (a network's shapes, a pipeline's classes) extend it."""
        n = len(getattr(self, "classes_", ()))
        if n != n_classes:
            raise BenchError(f"the model has {n} classes, the manifest lists {n_classes}")

    def save(self, path) -> None:
        """Write the fitted candidate into the folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._save_model(path)
        atomic_write_json(
            path / CANDIDATE_FILE,
            {
                "type": self.type_name,
                "kind": self.kind,
                "params": self.get_params(deep=False),
                "classes": self.classes_.tolist(),
            },
        )

    @classmethod
    def load(cls, path) -> "Candidate":
        path = Path(path)
        meta = json.loads((path / CANDIDATE_FILE).read_text())
        obj = cls(**meta["params"])
        obj._set_classes(None, np.asarray(meta["classes"]))
        obj._load_model(path)
        return obj


def fit_candidate(
    cand: Candidate, X, y, X_val=None, y_val=None, *, classes=None, **extras
) -> Candidate:
    """Call ``cand.fit`` with the contract's arguments plus those of ``classes`` and
    ``extras`` (``workdir``, ``epoch_callbacks``) the candidate declares in
    ``fit_accepts``; the others are not passed."""
    unknown = set(extras) - FIT_EXTRAS
    if unknown:
        raise TypeError(f"fit_candidate: unknown keyword(s) {sorted(unknown)}")
    kw = {
        k: v
        for k, v in {"classes": classes, **extras}.items()
        if k in cand.fit_accepts and v is not None
    }
    cand.fit(X, y, X_val, y_val, **kw)
    return cand


def predict_proba_for(cand: Candidate, X, classes) -> np.ndarray:
    """``cand.predict_proba(X)`` with one column per entry of ``classes`` (in that order):
    a class the candidate never saw gets probability 0."""
    p = np.asarray(cand.predict_proba(X), dtype=np.float64)
    own = np.asarray(cand.classes_)
    classes = np.asarray(classes)
    if len(own) == len(classes) and np.array_equal(own, classes):
        return p
    if p.shape[1] != len(own):
        raise BenchError(
            f"candidate '{cand.type_name}': predict_proba gave {p.shape[1]} "
            f"columns for {len(own)} classes_"
        )
    out = np.zeros((len(p), len(classes)))
    pos = {c: i for i, c in enumerate(classes.tolist())}  # plain Python values
    for j, key in enumerate(own.tolist()):
        if key not in pos:
            raise BenchError(
                f"candidate '{cand.type_name}' predicts class {key!r}, which is "
                "not a class of the data"
            )
        out[:, pos[key]] = p[:, j]
    return out


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


_RELEASE_HOOKS: list = []


def on_release(hook):
    """Register ``hook()`` for :func:`release_memory` to call (once per hook): a plugin
    whose framework keeps state after its models are gone (``cnn.runtime`` for Keras and
    TensorFlow) frees it there. Returns ``hook``, so it works as a decorator."""
    if hook not in _RELEASE_HOOKS:
        _RELEASE_HOOKS.append(hook)
    return hook


def release_memory() -> None:
    """Let a long-lived process give back what finished models held: the registered
    plugins' framework state (:func:`on_release`) and Python's garbage. Called after each
    work unit and each tuning trial, when no model of that process is in use."""
    for hook in list(_RELEASE_HOOKS):
        hook()
    gc.collect()
