"""A new lab's head: a predictor's output corrected with the cells' own features, fitted on a
few labelled cells of the lab and shrunk toward the original by inner cross-validation.

``p' = softmax(log(p) / T + b + s(x) W)``: the predictor's combined output ``p``, one
temperature ``T``, one offset ``b_k`` per class and a linear map ``W`` (D, K) of the cell's
hand-crafted features ``x`` (a feature set, :mod:`features`, of the image's centre: the
cell rather than its surroundings, whose framing differs most between labs), standardised as ``s(x) = (x -
mean) / scale`` with the mean and spread of the lab's cells adapted on (labelled or not:
the lab's own images, never a scored one). It refits what adapts cheaply on a hundred
labels: the combiner's output and a new linear head beside the members, not the members.

The fit minimises the class-balanced log loss (each class weighs as much, as the balanced
accuracy the labs are ranked by does) plus ``lam * (log(T)^2 + |b|^2) + lam_w * |W|^2``.
At ``W = 0`` this is :mod:`core.recalibrate`'s output recalibration; at a large ``lam`` and
``lam_w`` the original output comes back. The penalties are chosen by stratified inner
cross-validation on the same N cells among :data:`OPTIONS` (recalibration only, then
feature heads of decreasing shrinkage), by the class-balanced log loss of the held-in
folds' fits on the held-out cells; so a lab whose cells say nothing new keeps (nearly) the
original answers, and one whose cells the members misread gets a head that reads them.

The head is stored as arrays (:meth:`LabHead.save`, an ``.npz``, no pickle) and applied by
the predictor to every image (:meth:`LabHead.apply`).
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

from core.candidate import build_candidate
from core.errors import BenchError

_EPS = 1e-12
#: the temperature's and offsets' penalty beside a feature map: light, so the head can move
#: the class balance as far as the lab's cells ask (measured on three labs' curves, 0.1
#: cost PBC about 5 points at N = 100; benchmarks/README.md)
HEAD_LAMBDA = 0.001
#: ``(lam, lam_w)`` tried by the inner cross-validation; ``lam_w = inf``: no feature map
#: (output recalibration only). The first is "keep the original".
OPTIONS: tuple[tuple[float, float], ...] = (
    (1e4, np.inf),
    (10.0, np.inf),
    (1.0, np.inf),
    (0.1, np.inf),
    (0.01, np.inf),
    (HEAD_LAMBDA, 3.0),
    (HEAD_LAMBDA, 1.0),
    (HEAD_LAMBDA, 0.3),
    (HEAD_LAMBDA, 0.1),
    (HEAD_LAMBDA, 0.03),
    (HEAD_LAMBDA, 0.01),
)
_ARRAYS = ("temperature", "bias", "weights", "mean", "scale")
#: the candidate type whose ``features_of`` computes a head's features where only the
#: kernel may be imported (a saved predictor): any feature candidate extracts the same
#: features of the same crop; this one is the lightest to build
FEATURE_READER = "feature_lda"


@dataclass
class LabHead:
    """A fitted head (see the module docstring). ``feature_set``: the feature set its
    ``weights`` read (``{extractor: params}``; empty with no feature map), of the central
    ``crop`` of each image's side (:func:`core.images.center_crop`)."""

    temperature: float
    bias: np.ndarray
    weights: np.ndarray  # (D, K); (0, K) without a feature map
    mean: np.ndarray
    scale: np.ndarray
    feature_set: dict = field(default_factory=dict)
    crop: float = 1.0

    @property
    def uses_features(self) -> bool:
        return bool(self.weights.size) and bool(np.any(self.weights))

    def features_of(self, images) -> np.ndarray:
        """The features this head reads of model-input ``images`` (N, S, S, 3), through
        the feature candidate type :data:`FEATURE_READER` (the kernel names no extractor)."""
        reader = build_candidate(
            {"type": FEATURE_READER, "params": {"features": self.feature_set, "crop": self.crop}}
        )
        return reader.features_of(images)

    def logits(self, proba, features=None) -> np.ndarray:
        logp = np.log(np.clip(np.asarray(proba, dtype=np.float64), _EPS, 1.0))
        z = logp / float(self.temperature) + self.bias
        if self.uses_features:
            if features is None:
                raise BenchError("the lab head reads the cells' features; none were given")
            z = z + standardise(features, self.mean, self.scale) @ self.weights
        return z

    def apply(self, proba, features=None) -> np.ndarray:
        """The adapted probabilities of ``proba`` (N, K) (or (F, N, K)) for cells with
        ``features`` (N, D) (ignored without a feature map)."""
        return softmax(self.logits(proba, features), axis=-1)

    # -- storage: arrays, no pickle -----------------------------------------------------
    def save(self, path: Path) -> None:
        buf = io.BytesIO()
        np.savez(
            buf,
            temperature=np.float64(self.temperature),
            bias=self.bias,
            weights=self.weights,
            mean=self.mean,
            scale=self.scale,
            feature_set=np.frombuffer(
                json.dumps(self.feature_set, sort_keys=True).encode(), dtype=np.uint8
            ),
            crop=np.float64(self.crop),
        )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "LabHead":
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: np.asarray(z[k], dtype=np.float64) for k in _ARRAYS}
                spec = json.loads(bytes(z["feature_set"]).decode())
                crop = float(z["crop"])
        except (OSError, ValueError, KeyError) as exc:
            raise BenchError(f"lab head {path}: unreadable ({exc})") from None
        k = arrays["bias"].shape[0]
        if arrays["weights"].ndim != 2 or arrays["weights"].shape[1] != k:
            raise BenchError(f"lab head {path}: weights of shape {arrays['weights'].shape}")
        return cls(
            float(arrays["temperature"]),
            arrays["bias"],
            arrays["weights"],
            arrays["mean"],
            arrays["scale"],
            spec,
            crop,
        )


def standardise(features, mean, scale) -> np.ndarray:
    """``(x - mean) / scale``, missing values (NaN) at the mean (0)."""
    x = (np.asarray(features, dtype=np.float64) - mean) / scale
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def _moments(reference) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(reference, dtype=np.float64)
    ref = np.where(np.isfinite(ref), ref, np.nan)
    with np.errstate(all="ignore"):
        mean = np.nan_to_num(np.nanmean(ref, axis=0))
        scale = np.nan_to_num(np.nanstd(ref, axis=0))
    return mean, np.where(scale > 1e-8, scale, 1.0)


def _class_weights(y, k: int) -> np.ndarray:
    counts = np.bincount(y, minlength=k).astype(np.float64)
    w = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    return w[y] / w[y].sum()


def _objective(logp, x, y, k: int, lam: float, lam_w: float):
    """The penalised class-balanced log loss and its gradient, of ``theta = (log T, b,
    W.ravel())``; ``x`` is used only with a finite ``lam_w``. Returns ``(f, d)``."""
    d = x.shape[1] if np.isfinite(lam_w) else 0
    x = x[:, :d]
    sw = _class_weights(y, k)
    onehot = np.eye(k)[y]

    def loss(theta):
        t0, b, w = theta[0], theta[1 : k + 1], theta[k + 1 :].reshape(d, k)
        s = np.exp(-t0)
        z = logp * s + b + (x @ w if d else 0.0)
        ls = log_softmax(z, axis=1)
        g = (np.exp(ls) - onehot) * sw[:, None]  # d(loss)/dz
        val = -(sw * ls[np.arange(len(y)), y]).sum() + lam * (t0**2 + b @ b)
        grad = np.concatenate(
            [[-s * (g * logp).sum() + 2 * lam * t0], g.sum(0) + 2 * lam * b]
            + ([(x.T @ g + 2 * lam_w * w).ravel()] if d else [])
        )
        if d:
            val += lam_w * (w * w).sum()
        return val, grad

    return loss, d


def _fit_one(logp, x, y, k: int, lam: float, lam_w: float):
    """``(theta0 = log T, b, W)`` minimising the weighted log loss plus the penalties."""
    loss, d = _objective(logp, x, y, k, lam, lam_w)
    res = minimize(loss, np.zeros(1 + k + d * k), jac=True, method="L-BFGS-B")
    return res.x[0], res.x[1 : k + 1], res.x[k + 1 :].reshape(d, k)


def _log_proba(logp, x, t0, b, w) -> np.ndarray:
    z = logp * np.exp(-t0) + b + (x[:, : w.shape[0]] @ w if w.shape[0] else 0.0)
    return log_softmax(z, axis=1)


class Fitted(NamedTuple):
    """What :func:`fit` returns: the ``head``, its ``record`` (the option the inner
    cross-validation chose and the held-out losses) and ``oof``: the chosen option's
    cross-fitted probabilities of the N cells (each from a fit without it; the original
    output where the cells were too few to cross-fit), for prediction sets calibrated
    on them."""

    head: LabHead
    record: dict
    oof: np.ndarray


def fit(
    proba,
    features,
    y,
    *,
    reference=None,
    feature_set=None,
    crop: float = 1.0,
    seed: int = 0,
    folds: int = 5,
    groups=None,
) -> Fitted:
    """Fit a head on ``proba`` (N, K), the cells' ``features`` (N, D) and their labels ``y``
    (class indices); ``reference``: the features that set the standardisation (the lab's
    cells adapted on; default ``features``); ``feature_set`` and ``crop``: what the
    features are, recorded in the head; ``groups`` (each cell's slide or patient): the
    chosen option's cross-fitted outputs (``oof``, for prediction sets) leave whole groups
    out, as the lab's other slides meet the head (the option itself is chosen over cells:
    grouped folds chose heads too timid to help, benchmarks/README.md)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    n, k = proba.shape
    feats = np.zeros((n, 0)) if features is None else np.asarray(features, dtype=np.float64)
    if len(feats) != n or len(y) != n:
        raise BenchError(f"lab head: {n} outputs, {len(feats)} feature rows, {len(y)} labels")
    mean, scale = _moments(feats if reference is None else reference)
    x = standardise(feats, mean, scale)
    logp = np.log(np.clip(proba, _EPS, 1.0))
    options = [o for o in OPTIONS if np.isinf(o[1]) or x.shape[1]]
    counts = np.bincount(y, minlength=k)
    # as many inner folds as the rarest class allows, at least 2 (a class of one cell is
    # then absent from one fold's fit: its held-out loss says what that costs)
    n_inner = int(min(folds, max(2, counts[counts > 0].min())))
    losses: dict[str, float] = {}
    oofs = {OPTIONS[0]: proba}
    if counts.max() >= n_inner and len(counts[counts > 0]) >= 2:
        with warnings.catch_warnings():  # "the least populated class has only 1 member"
            warnings.simplefilter("ignore", UserWarning)
            folds_ = StratifiedKFold(n_inner, shuffle=True, random_state=seed)
            split = list(folds_.split(x, y))
        for lam, lam_w in options:
            held = np.zeros((n, k))
            for tr, te in split:
                t0, b, w = _fit_one(logp[tr], x[tr], y[tr], k, lam, lam_w)
                held[te] = _log_proba(logp[te], x[te], t0, b, w)
            nll = -held[np.arange(n), y]
            losses[_name(lam, lam_w)] = float((_class_weights(y, k) * nll).sum())
            oofs[(lam, lam_w)] = np.exp(held)
        chosen = min(options, key=lambda o: losses[_name(*o)])
        if groups is not None and len(set(groups)) >= n_inner and chosen != OPTIONS[0]:
            # the outputs the prediction sets are calibrated on: each cell's from a fit
            # without its slide or patient, as the lab's other slides will meet the head
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                by_group = StratifiedGroupKFold(n_inner, shuffle=True, random_state=seed)
                parts = list(by_group.split(x, y, groups=np.asarray(groups)))
            held = np.zeros((n, k))
            for tr, te in parts:
                t0, b, w = _fit_one(logp[tr], x[tr], y[tr], k, *chosen)
                held[te] = _log_proba(logp[te], x[te], t0, b, w)
            oofs[chosen] = np.exp(held)
    else:
        chosen = OPTIONS[0]  # too few cells of some class to choose: keep the original
    t0, b, w = _fit_one(logp, x, y, k, *chosen)
    d = x.shape[1]
    head = LabHead(
        temperature=float(np.exp(t0)),
        bias=b,
        weights=w if w.shape[0] else np.zeros((0, k)),
        mean=mean if w.shape[0] else np.zeros(0),
        scale=scale if w.shape[0] else np.zeros(0),
        feature_set=dict(feature_set or {}) if w.shape[0] else {},
        crop=float(crop) if w.shape[0] else 1.0,
    )
    record = {
        "chosen": _name(*chosen),
        "features_used": bool(w.shape[0]),
        "n_features": int(d),
        "lambda": float(chosen[0]),
        "lambda_weights": None if np.isinf(chosen[1]) else float(chosen[1]),
        "temperature": head.temperature,
        "inner_folds": n_inner if losses else 0,
        "inner_log_loss": losses,
    }
    return Fitted(head, record, oofs[chosen])


def _name(lam: float, lam_w: float) -> str:
    if np.isinf(lam_w):
        return f"recalibrate (lam {lam:g})"
    return f"feature head (lam {lam:g}, lam_w {lam_w:g})"


__all__ = ["Fitted", "LabHead", "OPTIONS", "fit", "standardise"]
