"""The saved ensemble predictor: what users keep after a benchmark.

A predictor directory is self-describing and verified on load::

    predictor/
      manifest.json                 members, weights, classes, input size, preprocessing,
                                    training data summary, package versions, sha256 of files
      members/<name>/fold<k>/...    each member's fitted fold models (candidate.json + model)

Members are the **fold models** of the cross-validation (each member's probability is
the mean over its fold models): the exact models whose out-of-fold scores are on the
leaderboard, bagged, with no extra training. Nothing is unpickled: Keras models load
with ``safe_mode=True``, scikit-learn pipelines with skops and an allow-list, the
ensemble's state is JSON.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal, Optional, Union, get_args

import numpy as np
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt,
                      StrictStr, ValidationError, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from core import registry
from core.calibration import apply_temperature
from core.conformal import ConformalSets, join_set, review_of
from core.candidate import CANDIDATE_FILE, Candidate, load_candidate
from core.errors import BenchError
from core.colour import BAG_COLOUR, bag_colour
from core.images import Preprocessing, as_items, resolve_preprocessing
from core.progress import progress_iter
from core.shift import ShiftReference
from ensembles.bags import CELL_AGGREGATORS, call_bag
from ensembles.base import Ensemble
from ensembles.model_card import CARD, model_card
from ensembles.tta import TTA_VIEWS, VIEWS
from core.io import (atomic_write_json, atomic_write_text, file_sha256, is_inside, json_default,
                     package_versions, staged)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Images per call of the fused Keras graph. Larger calls buy no speed on CPU and cost memory
# (quick PBC predictor with a 224-px backbone: peak 3.9 GiB at 128, 5.9 GiB at 256).
FUSED_BATCH = 128


class Predictor:
    """A loaded ensemble predictor. Use :func:`load_predictor`.

    Attributes
    ----------
    classes_ : array of class names.
    preprocessing : the :class:`core.images.Preprocessing` record of the manifest; every
        input goes through it, as the training images did.
    image_size : side of the square images the members were trained on.
    member_names_ : members in the ensemble's order.
    member_kinds_ : ``{name: "cnn" | "baseline"}``.
    """

    def __init__(self, manifest: dict, members: dict[str, list], ensemble, path: Path):
        self.manifest = manifest
        self.members_ = members
        self.ensemble_ = ensemble
        self.path = path
        self.classes_ = np.array(manifest["classes"])
        self.preprocessing = resolve_preprocessing(manifest)
        self.image_size = self.preprocessing.image_size
        self.member_names_ = [m["name"] for m in manifest["members"]]
        self.member_kinds_ = {m["name"]: m.get("kind") or members[m["name"]][0].kind
                              for m in manifest["members"]}
        # Keras members run as one compiled TensorFlow graph per batch: every fold model of
        # every such member on the same input tensor (traced once, any batch size). Frozen
        # backbones with identical weights (the fold models of a frozen-transfer member)
        # run once per batch, each fold model adding only its head.
        self._fused_names = [n for n in self.member_names_   # declared: model -> softmax
                             if all(c.fused_inference for c in members[n])]
        self._fused = None
        self.tta = manifest.get("tta", "none")
        shift = manifest.get("shift")
        self.shift_reference_ = ShiftReference.from_dict(shift) if shift else None
        cp = manifest.get("conformal")   # prediction sets and review rule (core.conformal)
        try:
            self.conformal_ = ConformalSets.from_dict(cp, len(self.classes_)) if cp else None
            counts = {len(members[n]) for n in self.member_names_}
            need = self.conformal_.n_folds if self.conformal_ is not None else None
            if need is not None and counts != {need}:
                raise BenchError(f"its cross-conformal sets need {need} fold models per "
                                 f"member, the members have {sorted(counts)}")
        except BenchError as exc:
            raise BenchError(f"predictor {path}: {exc}") from None

    # -- probabilities --------------------------------------------------------------
    def _fused_plan(self) -> list[tuple]:
        """``(trunk_key, trunk, head layers)`` per fused fold model, in member order (see
        ``KerasCandidate.inference_parts``)."""
        return [c.inference_parts() for n in self._fused_names for c in self.members_[n]]

    def _fused_fn(self):
        if self._fused is None:
            import tensorflow as tf
            plan = self._fused_plan()
            spec = tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.uint8)

            @tf.function(input_signature=[spec])
            def run(x):
                trunks, outs = {}, []
                for key, model, head in plan:
                    if key is None:
                        h = model(x, training=False)
                    else:
                        if key not in trunks:
                            trunks[key] = model(x, training=False)
                        h = trunks[key]
                        for layer in head:
                            h = layer(h, training=False)
                    outs.append(tf.cast(h, tf.float32))
                return tf.stack(outs)
            self._fused = run
        return self._fused

    def member_fold_probas(self, images: np.ndarray) -> list[np.ndarray]:
        """Each member's probabilities per fold model, (n_folds, N, K) each, for
        (N, S, S, 3) images."""
        out = {}
        if self._fused_names and len(images):
            fn = self._fused_fn()
            stacked = np.concatenate([fn(images[i:i + FUSED_BATCH]).numpy()   # (models, N, K)
                                      for i in range(0, len(images), FUSED_BATCH)],
                                     axis=1).astype(np.float64)
            i = 0
            for n in self._fused_names:
                k = len(self.members_[n])
                out[n] = stacked[i:i + k]
                i += k
        for n in self.member_names_:
            if n not in out:
                out[n] = np.stack([m.predict_proba(images) for m in self.members_[n]])
        return [out[n] for n in self.member_names_]

    def member_probas(self, images: np.ndarray) -> list[np.ndarray]:
        """Each member's probabilities (mean over its fold models) for (N, S, S, 3) images."""
        return [m.mean(axis=0) for m in self.member_fold_probas(images)]

    @property
    def needs_fold_proba_(self) -> bool:
        """Whether the stored prediction sets are cross-conformal (each fold model's
        probabilities needed, see :class:`core.conformal.ConformalSets`)."""
        return self.conformal_ is not None and self.conformal_.n_folds is not None

    @property
    def bag_colour_(self) -> str:
        """The per-bag colour normalisation a bag task was trained with (``"none"``)."""
        spec = self.bag_task_
        return (spec.get("colour") or {}).get("bag_colour", "none") if spec else "none"

    def predict_proba(self, x, batch_size: int = 256, folds: bool = False,
                      one_bag: bool = False):
        """Class probabilities (N, n_classes) for image paths or ``uint8`` arrays of any
        size; images are read and resized one batch at a time, each only once (files: the
        next batch is read while the current one is classified). With ``folds``:
        ``(proba, fold_proba)``, the second (n_folds, N, n_classes), the ensemble as each
        fold's models make it (for cross-conformal sets).

        A bag task trained with ``[patients] bag_colour`` normalises the colour of a bag's
        cells together (:func:`core.colour.bag_colour`): :meth:`predict_bags` does it per
        bag; here ``x`` is read whole and normalised as one bag (``one_bag``: ``x`` is
        model input already normalised so)."""
        if isinstance(x, np.ndarray) and x.ndim == 4 and x.shape[1:3] == (self.image_size,) * 2:
            items = x
        else:
            items = as_items(x)
        if not one_bag:
            items = self.normalise_bag(self.preprocessing.apply_batch(items)) \
                if self.bag_colour_ != "none" else items
        prep = self.preprocessing.apply_batch
        starts = list(range(0, len(items), batch_size))
        chunks, fold_chunks = [], []
        with ThreadPoolExecutor(1) as reader:
            pending = reader.submit(prep, items[:batch_size])
            for i in starts:
                images = pending.result()
                if i + batch_size < len(items):
                    pending = reader.submit(prep, items[i + batch_size:i + 2 * batch_size])
                p, pf = self.proba_of_images(images, folds=True) if folds else (
                    self.proba_of_images(images), None)
                chunks.append(self._temper(p))
                if folds:
                    fold_chunks.append(self._temper(pf))
        k = len(self.classes_)
        proba = np.concatenate(chunks) if chunks else np.zeros((0, k))
        if not folds:
            return proba
        return proba, (np.concatenate(fold_chunks, axis=1) if fold_chunks
                       else np.zeros((self.n_folds_, 0, k)))

    def _temper(self, p: np.ndarray) -> np.ndarray:
        t = (self.manifest.get("calibration") or {}).get("temperature")   # [predictor]
        # temperature_scaling: T fitted on the ensemble's out-of-fold probabilities
        return apply_temperature(p, float(t)) if t else p

    @property
    def n_folds_(self) -> int:
        """How many fold models each member has (the cross-validation's folds)."""
        return len(self.members_[self.member_names_[0]])

    def predict_batches(self, items, batch_size: int, *, keep_full: bool = False,
                        desc: str = "predicting", show: bool = True):
        """The one batched prediction loop over files (``predict``, ``evaluate``): yield
        ``(rows, X, full, proba, errors, fold_proba)`` per batch of ``items``, each file
        decoded once and the next batch read while this one is classified. ``rows``: the
        positions in ``items`` of the readable images ``X`` (``full``: them at their own
        size, with ``keep_full``); ``proba``: their probabilities (``None`` when none is
        readable); ``errors``: ``[(position, exception)]`` of the unreadable ones;
        ``fold_proba``: each fold's ensemble's probabilities when the stored prediction
        sets are cross-conformal, else ``None``."""
        n_batches = -(-len(items) // batch_size)
        folds = self.needs_fold_proba_
        batches = self.preprocessing.batches(items, batch_size, keep_full=keep_full)
        for s, X, full, good, errs in progress_iter(batches, total=n_batches, desc=desc,
                                                     enabled=show and n_batches > 1):
            rows = s + np.asarray(good, dtype=np.int64)
            proba = pf = None
            if len(rows):
                out = self.predict_proba(X, batch_size=len(X), folds=folds)
                proba, pf = out if folds else (out, None)
            yield rows, X, full, proba, [(s + j, exc) for j, exc in errs], pf

    def proba_of_images(self, images: np.ndarray, folds: bool = False):
        """The ensemble's probabilities for preprocessed (N, S, S, 3) images, averaged over
        the test-time views of ``[predictor] tta`` (before any temperature). With
        ``folds``: ``(proba, fold_proba)``, the second the ensemble of each fold's models
        (n_folds, N, K), from the same model outputs."""
        views = TTA_VIEWS[self.tta]
        per_view = [self.member_fold_probas(np.ascontiguousarray(VIEWS[v](images)))
                    for v in views]
        proba = np.mean([self.ensemble_.combine([m.mean(axis=0) for m in mp])
                         for mp in per_view], axis=0)
        if not folds:
            return proba
        fold_proba = np.stack([np.mean([self.ensemble_.combine([m[k] for m in mp])
                                        for mp in per_view], axis=0)
                               for k in range(self.n_folds_)])
        return proba, fold_proba

    def adapt(self, x, max_images: int = 2000, seed: int = 0) -> dict:
        """Unsupervised test-time adaptation (AdaBN) of the members that declare
        ``adaptable`` on a seeded sample of at most ``max_images`` of ``x`` (no labels).
        Changes this loaded predictor only, never its files. Returns what was done."""
        items = x if isinstance(x, np.ndarray) and x.ndim == 4 else as_items(x)
        rows = np.arange(len(items))
        if len(rows) > max_images:
            rows = np.sort(np.random.default_rng(seed).choice(rows, max_images, replace=False))
        X = self.preprocessing.apply_batch([items[i] for i in rows] if not isinstance(
            items, np.ndarray) else items[rows])
        layers, models = 0, 0
        for n in self.member_names_:
            for m in self.members_[n]:
                if m.adaptable:
                    layers += m.adapt(X)
                    models += 1
        self._fused = None   # the fused graph holds the old statistics
        return {"method": "AdaBN (batch-norm statistics re-estimated on the new images)",
                "images": int(len(X)), "fold_models": models, "layers": layers}

    def shift_scores(self, x, batch_size: int = 256) -> np.ndarray:
        """Per image, how far its colours lie from the training images' (0-1: the share of
        training images closer to their mean; see :mod:`core.shift`). ``None`` for
        predictors saved without a description of their training images."""
        if self.shift_reference_ is None:
            return None
        items = x if isinstance(x, np.ndarray) and x.ndim == 4 else as_items(x)
        return np.concatenate([self.shift_reference_.score(
            self.preprocessing.apply_batch(items[i:i + batch_size]))
            for i in range(0, len(items), batch_size)]) if len(items) else np.zeros(0)

    def predict_review(self, x, batch_size: int = 256) -> dict:
        """What ``bench predict`` writes per image: ``prediction``, ``confidence``,
        ``prediction_set`` (classes joined by ``|``), ``set_size``, ``review`` (set size
        other than one, shift score beyond the stored limit, or confidence below the stored
        threshold), the reasons, ``shift_score`` and ``proba``."""
        if self.conformal_ is None:
            raise BenchError(f"predictor {self.path} was saved without conformal prediction "
                             "sets; run it again, or bench calibrate it on labelled images")
        proba, fold_proba = self.predict_proba(x, batch_size, folds=True) \
            if self.needs_fold_proba_ else (self.predict_proba(x, batch_size), None)
        shift = self.shift_scores(x, batch_size)
        rv = review_of(self.conformal_, self.manifest["conformal"].get("review") or {}, proba,
                       shift, fold_proba)
        return {"prediction": self.classes_[proba.argmax(axis=1)],
                "confidence": proba.max(axis=1),
                "prediction_set": [join_set(r, self.classes_) for r in rv.pop("sets")],
                **rv, "shift_score": shift, "proba": proba}

    def predict(self, x, batch_size: int = 256) -> np.ndarray:
        """Class names of the most probable class."""
        return self.classes_[np.argmax(self.predict_proba(x, batch_size), axis=1)]

    # -- bags (patients) ------------------------------------------------------------
    @property
    def bag_task_(self) -> dict | None:
        """A bag task's settings (positive class, aggregator and its params, threshold,
        min_cells; each default from :class:`BagTask`), else ``None``."""
        bags = self.manifest.get("bags")
        return None if bags is None else BagTask.model_validate(bags).model_dump()

    def normalise_bag(self, X: np.ndarray) -> np.ndarray:
        """One bag's preprocessed cells (N, S, S, 3) colour-normalised together as the bag
        task was trained (``[patients] bag_colour``); unchanged without it."""
        if self.bag_colour_ == "none" or not len(X):
            return X
        return bag_colour(X, np.zeros(len(X)), self.bag_colour_)

    def load_bag(self, items) -> tuple[np.ndarray, list, list]:
        """One bag's cells as model input: ``(X, ok, errors)`` as
        :meth:`core.images.Preprocessing.load` with ``skip_errors`` gives them (unreadable
        files skipped), ``X`` then normalised together (:meth:`normalise_bag`)."""
        X, _, ok, errors = self.preprocessing.load(items, skip_errors=True)
        return self.normalise_bag(X), ok, errors

    def predict_bags(self, bags: dict, batch_size: int = 256) -> list[dict]:
        """One diagnosis per bag (patient) from its cells, for a predictor saved by a bag
        task (``[data] bags = true``).

        ``bags``: ``{name: image paths or uint8 arrays}``. Unreadable files (not an image,
        empty, truncated) are skipped, as single-image prediction skips them; one bag's bad
        files never stop the others. Returns one dict per bag: ``bag``, ``n_cells`` (the
        readable cells), ``n_skipped`` and ``skipped`` (``(item, reason)`` of each
        unreadable one), ``probability`` (the stored aggregator over the cells'
        probabilities of the positive class; NaN without cells), ``decision`` (the
        positive class when the probability reaches the stored threshold, else the
        negative one; ``"refer"`` below the stored ``min_cells``; ``"none"`` without a
        readable cell), ``reason`` (why ``refer`` or ``none``, else empty), ``threshold``,
        ``min_cells`` and ``cells`` (each readable cell's probabilities, (n, n_classes)).
        """
        spec = self.bag_task_
        if spec is None:
            raise BenchError(f"predictor {self.path} was not trained on a bag task "
                             "([data] bags = true): it classifies single images")
        classes = [str(c) for c in self.classes_]
        pos = classes.index(spec["positive"])
        out = []
        for name, items in bags.items():
            items = as_items(items)
            if not len(items):   # a patient folder without images: its row says so
                score, decision, _ = call_bag(spec, classes, np.zeros(0), None)
                out.append({"bag": name, "n_cells": 0, "n_skipped": 0, "skipped": [],
                            "probability": score, "decision": decision,
                            "reason": "no image file", "threshold": float(spec["threshold"]),
                            "min_cells": spec["min_cells"],
                            "cells": np.zeros((0, len(classes))), "cell_items": []})
                continue
            X, ok, errors = self.load_bag(items)   # the bag's cells together
            skipped = [(f"array {i}" if isinstance(items[i], np.ndarray) else str(items[i]),
                        str(exc)) for i, exc in errors]
            proba = (self.predict_proba(X, batch_size, one_bag=True) if len(ok)
                     else np.zeros((0, len(classes))))
            shift = self.shift_reference_.score(X) if (
                self.shift_reference_ is not None and len(ok)) else None
            score, decision, reason = call_bag(spec, classes, proba[:, pos], shift)
            out.append({"bag": name, "n_cells": int(len(ok)), "n_skipped": len(skipped),
                        "skipped": skipped, "probability": score, "decision": decision,
                        "reason": reason, "threshold": float(spec["threshold"]),
                        "min_cells": spec["min_cells"], "cells": proba,
                        "cell_items": [items[i] for i in ok]})
        return out

    # -- Grad-CAM -------------------------------------------------------------------
    @property
    def cnn_members_(self) -> list[str]:
        """Members whose fold models can explain themselves with Grad-CAM."""
        return [n for n in self.member_names_ if all(m.explainable for m in self.members_[n])]

    def explain_weights(self) -> dict[str, float]:
        """Weights of the CNN members' Grad-CAM maps: the ensemble's member weights
        (renormalised over the CNN members), or equal weights when the ensemble has none
        (stacking)."""
        cnn = self.cnn_members_
        if not cnn:
            kinds = ", ".join(f"{n} ({self.member_kinds_.get(n)})" for n in self.member_names_)
            raise BenchError(f"Grad-CAM needs a CNN member; this predictor's members are: {kinds}")
        w = self.ensemble_.member_weights()
        w = ([w[self.member_names_.index(n)] for n in cnn] if w is not None
             else [1.0] * len(cnn))
        total = float(np.sum(w))
        if total <= 0:
            w, total = [1.0] * len(cnn), float(len(cnn))
        return {n: float(v) / total for n, v in zip(cnn, w)}

    def _class_indices(self, class_index, n: int) -> np.ndarray:
        k = len(self.classes_)
        if isinstance(class_index, str):
            hits = np.flatnonzero(self.classes_ == class_index)
            if not len(hits):
                raise BenchError(f"unknown class '{class_index}'; classes: {list(self.classes_)}")
            class_index = int(hits[0])
        idx = np.asarray(class_index)
        if idx.dtype.kind not in "iu" or idx.ndim > 1 or (idx.ndim == 1 and len(idx) != n):
            raise BenchError(f"class_index must be None, a class index or name, or {n} "
                             f"indices, got {class_index!r}")
        idx = np.broadcast_to(idx.astype(np.int64), (n,)).copy()
        if ((idx < 0) | (idx >= k)).any():
            raise BenchError(f"class_index must be in [0, {k}), got {class_index}")
        return idx

    def explain(self, x, class_index=None, batch_size: int = 64) -> np.ndarray:
        """The ensemble's Grad-CAM maps, (N, S, S) ``float32`` in [0, 1] at the training
        resolution ``S`` (upsample to show them on the original image).

        A CNN member's map is the mean of its fold models' maps
        (``KerasCandidate.explain``); the ensemble's is their weighted mean
        (:meth:`explain_weights`). ``class_index``: ``None`` (each image's class predicted
        by the ensemble), a class index or name, or one index per image.
        """
        weights = self.explain_weights()
        items = x if isinstance(x, np.ndarray) and x.ndim == 4 else as_items(x)
        fixed = None if class_index is None else self._class_indices(class_index, len(items))
        maps = []
        for i in range(0, len(items), batch_size):
            images = self.preprocessing.apply_batch(items[i:i + batch_size])
            if fixed is None:
                target = np.argmax(self.ensemble_.combine(self.member_probas(images)), axis=1)
            else:
                target = fixed[i:i + batch_size]
            maps.append(self._explain_images(images, target, weights))
        s = self.image_size
        return np.concatenate(maps) if maps else np.zeros((0, s, s), np.float32)

    def _explain_images(self, images, target, weights) -> np.ndarray:
        out = np.zeros(images.shape[:3], dtype=np.float64)
        for n, w in weights.items():
            member = np.mean([m.explain(images, class_index=target) for m in self.members_[n]],
                             axis=0)
            out += w * member
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def __repr__(self):
        return (f"Predictor({self.manifest['ensemble']['name']}: {', '.join(self.member_names_)}; "
                f"classes={list(self.classes_)})")


def save_predictor(path, *, ensemble_name: str, ensemble, members: dict[str, list[Path]],
                   member_info: dict[str, dict], classes: list[str],
                   preprocessing: Preprocessing, training_data: dict,
                   extra: dict | None = None, tta: str = "none",
                   shift: ShiftReference | None = None) -> Path:
    """Write a predictor directory (atomically: a temp dir moved into place).

    ``members`` maps a member name to its saved fold-model folders; ``preprocessing`` is
    the record of how the training images were made, stored for :class:`Predictor`;
    ``tta`` the test-time views (:data:`TTA_VIEWS`); ``shift`` the description of the
    training images behind :meth:`Predictor.shift_scores`.
    """
    if tta not in TTA_VIEWS:
        raise BenchError(f"[predictor] tta must be one of {sorted(TTA_VIEWS)}, got {tta!r}")
    extra = {**(extra or {}), "tta": tta, **({"shift": shift.to_dict()} if shift else {})}
    with staged(path) as tmp:
        _write_predictor(tmp, ensemble_name, ensemble, members, member_info, classes,
                         preprocessing, training_data, extra)
    return Path(path)


def _write_predictor(tmp: Path, ensemble_name, ensemble, members, member_info, classes,
                     preprocessing: Preprocessing, training_data, extra) -> None:
    (tmp / "members").mkdir(parents=True)
    entries = []
    for name, folders in members.items():
        rel = []
        for k, folder in enumerate(folders):
            dest = tmp / "members" / name / f"model{k}"
            shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("checkpoint.keras"))
            rel.append(dest.relative_to(tmp).as_posix())
        entries.append({"name": name, "models": rel, **member_info.get(name, {})})
    atomic_write_text(tmp / CARD, model_card({   # MODEL_CARD.md, checksummed like the rest
        "classes": list(classes), "members": entries, "training_data": training_data,
        "ensemble": {"name": ensemble_name, "type": ensemble.type_name},
        "image_size": preprocessing.image_size, "preprocessing": preprocessing.to_dict(),
        **(extra or {})}))
    files = {p.relative_to(tmp).as_posix(): file_sha256(p)
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {
        "format": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": list(classes),
        "image_size": preprocessing.image_size,
        "preprocessing": preprocessing.to_dict(),
        "ensemble": {"name": ensemble_name, "type": ensemble.type_name,
                     "params": ensemble.get_params(), "state": ensemble.get_state()},
        "members": entries,
        "training_data": training_data,
        "versions": package_versions(),
        "files": files,
        **(extra or {}),
    }
    manifest = json.loads(json.dumps(manifest, default=json_default))
    manifest["manifest_sha256"] = manifest_digest(manifest)
    atomic_write_json(tmp / MANIFEST, manifest)


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, its own ``manifest_sha256`` left out: an
    edited manifest (weights, classes, checksums) no longer matches it."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _inside(root: Path, rel: str) -> Path:
    f = (root / rel).resolve()
    if not is_inside(f, root):
        raise BenchError(f"predictor manifest points outside its folder {root}: {rel}")
    return f


def _one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception as one short line (Keras and skops messages span several)."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, BenchError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) and abs(v) < 2 ** 63) or (isinstance(v, float) and math.isfinite(v))


class _Record(BaseModel):
    """A part of the manifest; a field's ``description`` says what its value must be, and
    is the error when it is not."""
    model_config = ConfigDict(strict=True, extra="allow")


def _number_check(v):
    if not _is_number(v):
        raise ValueError("not a finite number")
    return v


_Number = Annotated[Union[StrictInt, StrictFloat], AfterValidator(_number_check)]
_Name = Annotated[StrictStr, Field(min_length=1)]


class _Member(_Record):
    name: _Name = Field(description="'name' must be a non-empty string")
    models: list[_Name] = Field(min_length=1,
                                description="'models' must be a non-empty list of folders")
    type: Optional[StrictStr] = Field(None, description="'type' must be a string")
    kind: Optional[StrictStr] = Field(None, description="'kind' must be a string")
    weight: Optional[_Number] = Field(None, description="'weight' must be a number")


class _EnsembleRecord(_Record):
    name: StrictStr = Field(description="'name' must be a string")
    type: StrictStr = Field(description="'type' must be a string")
    params: dict = Field(description="'params' must be an object")
    state: dict = Field(description="'state' must be an object")


class _Band(_Record):
    lo: _Number = Field(description="'refer_band' needs a number 'lo'")
    hi: _Number = Field(description="'refer_band' needs a number 'hi'")

    @model_validator(mode="after")
    def _ordered(self):
        if self.lo > self.hi:
            raise _problem("'refer_band' has 'lo' above 'hi'")
        return self


class _BagColour(_Record):
    bag_colour: Literal[BAG_COLOUR] = Field(
        description=f"'bag_colour' must be one of {list(BAG_COLOUR)}")


class BagTask(_Record):
    positive: StrictStr = Field(description="'positive' must be one of 'classes'")
    aggregator: Literal[CELL_AGGREGATORS] = Field(
        description=f"'aggregator' must be one of {list(CELL_AGGREGATORS)}")
    params: dict = Field({}, description="'params' must be an object")
    threshold: _Number = Field(description="'threshold' must be a number")
    min_cells: Annotated[StrictInt, Field(ge=1)] = Field(
        1, description="'min_cells' must be an integer of at least 1")   # saved before it: none
    refer_band: Optional[_Band] = Field(   # saved before it: none
        None, description="'refer_band' must be an object with numbers 'lo' <= 'hi'")
    colour: Optional[_BagColour] = Field(   # [patients] bag_colour; saved before it: none
        None, description="'colour' must be an object with 'bag_colour'")


class _Calibration(_Record):
    temperature: Optional[Annotated[_Number, Field(ge=0)]] = Field(
        None, description="'temperature' must be a non-negative number")


def _problem(text: str) -> PydanticCustomError:
    return PydanticCustomError("manifest", "{problem}", {"problem": text})


class PredictorManifest(_Record):
    """The fields a predictor needs from ``manifest.json`` (a manifest whose digest was
    recomputed after an edit is refused here with one line, not a traceback later)."""
    files: dict[_Name, StrictStr] = Field(
        description="'files' must be an object of path: sha256 strings")
    classes: list[StrictStr] = Field(min_length=1,
                                     description="'classes' must be a non-empty list of class names")
    members: list[_Member] = Field(min_length=1, description="'members' must be a non-empty list")
    ensemble: _EnsembleRecord = Field(description="'ensemble' must be an object")
    image_size: Optional[Annotated[StrictInt, Field(gt=0)]] = Field(
        None, description="'image_size' must be a positive integer")
    bags: Optional[BagTask] = Field(None, description="'bags' must be an object")
    created: Optional[StrictStr] = Field(None, description="'created' must be a string")
    chosen_by: Optional[StrictStr] = Field(None, description="'chosen_by' must be a string")
    member_models: Optional[StrictStr] = Field(None,
                                               description="'member_models' must be a string")
    training_data: Optional[dict] = Field(None, description="'training_data' must be an object")
    versions: Optional[dict] = Field(None, description="'versions' must be an object")
    leaderboard: Optional[dict[str, _Number]] = Field(
        None, description="'leaderboard' must be an object of numbers")
    calibration: Optional[_Calibration] = Field(None,
                                                description="'calibration' must be an object")
    tta: Literal[tuple(TTA_VIEWS)] = Field(
        "none", description=f"'tta' must be one of {sorted(TTA_VIEWS)}")
    shift: Optional[dict] = Field(
        None, description="'shift' is not a valid description of the training images")

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, classes):
        if len(set(classes)) != len(classes):
            raise _problem("'classes' lists a class twice")
        return classes

    @field_validator("members")
    @classmethod
    def _distinct_members(cls, members):
        names = set()
        for m in members:
            if m.name in names:
                raise _problem(f"member '{m.name}' is listed twice")
            names.add(m.name)
        return members

    @model_validator(mode="after")
    def _consistent(self):
        if self.bags is not None and self.bags.positive not in self.classes:
            raise _problem("bags 'positive' must be one of 'classes'")
        prep = (self.model_extra or {}).get("preprocessing")
        if self.image_size is None and not isinstance(prep, dict):
            raise _problem("'image_size' is missing")
        try:
            size = resolve_preprocessing({"image_size": self.image_size,
                                          "preprocessing": prep}).image_size
        except Exception as exc:  # noqa: BLE001 - any failure is a bad record
            raise _problem(_one_line(exc)) from None
        if self.image_size is not None and size != self.image_size:
            raise _problem(f"'image_size' {self.image_size} differs from the preprocessing's "
                           f"{size}")
        if self.shift is not None:
            try:
                ref = ShiftReference.from_dict(self.shift)
                ok = ref.precision.shape == (len(ref.mean),) * 2 and len(ref.reference) > 1 \
                    and np.isfinite(ref.precision).all()
            except (TypeError, ValueError, KeyError, AttributeError):
                ok = False
            if not ok:
                raise _problem(PredictorManifest.model_fields["shift"].description)
        return self


def _submodel(annotation):
    """The :class:`_Record` a field's annotation holds (alone, in a list, or optional)."""
    if isinstance(annotation, type) and issubclass(annotation, _Record):
        return annotation
    return next(filter(None, map(_submodel, get_args(annotation))), None)


def _manifest_problem(err: dict, manifest: dict) -> str:
    """The first pydantic error of a manifest in the words of the field's description,
    named by the member, ``ensemble``, ``bags`` or ``calibration`` it belongs to."""
    if err["type"] == "manifest":
        return err["ctx"]["problem"]
    model, prefix, what, loc = PredictorManifest, "", err["msg"], list(err["loc"])
    while loc:
        key = loc.pop(0)
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:        # a union's tag or a table's key
            continue
        what, model = prefix + field.description, _submodel(field.annotation)
        if model is None:
            break
        prefix = f"{key} "
        if key == "members":
            if not (loc and isinstance(loc[0], int)):
                break
            i = loc.pop(0)
            m = manifest["members"][i]
            name = m.get("name") if isinstance(m, dict) else None
            what = f"member {i} must be an object"
            prefix = f"member '{name}': " if isinstance(name, str) and name else f"member {i}: "
    return what


def _check_fields(manifest: dict, mpath: Path) -> PredictorManifest:
    """The manifest as a :class:`PredictorManifest`; a defect is one :class:`BenchError`
    line naming the manifest file and the field."""
    try:
        return PredictorManifest.model_validate(manifest)
    except ValidationError as exc:
        raise BenchError(f"bad predictor manifest {mpath}: "
                         f"{_manifest_problem(exc.errors()[0], manifest)}") from None


def _check_candidate_files(path: Path, manifest: dict) -> None:
    """Each fold model's ``candidate.json`` (JSON, checksummed above) names a type and
    has one class per class of the manifest. Loads no model."""
    k = len(manifest["classes"])
    for m in manifest["members"]:
        for j, rel in enumerate(m["models"]):
            where = f"predictor {path}: member {m['name']} model {j}"
            meta_path = path / rel / CANDIDATE_FILE
            if not meta_path.is_file():
                raise BenchError(f"{where}: not a saved candidate (no {CANDIDATE_FILE})")
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError, RecursionError) as exc:
                raise BenchError(f"{where}: unreadable {CANDIDATE_FILE} ({_one_line(exc)})") \
                    from None
            if not (isinstance(meta, dict) and isinstance(meta.get("type"), str)
                    and isinstance(meta.get("params"), dict)
                    and isinstance(meta.get("classes"), list)):
                raise BenchError(f"{where}: {CANDIDATE_FILE} must be an object with 'type', "
                                 "'params' and a 'classes' list")
            if len(meta["classes"]) != k:
                raise BenchError(f"{where}: the model has {len(meta['classes'])} classes, the "
                                 f"manifest lists {k} ({', '.join(manifest['classes'])})")


def verify_predictor(path) -> dict:
    """Check the manifest's own digest, its fields, and every file against its sha256 (a
    missing, altered or unlisted file is refused); return the manifest. Loads no model."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BenchError(f"not a predictor directory (no {MANIFEST}): {path}")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError, RecursionError) as exc:   # JSONDecodeError, UnicodeDecodeError
        raise BenchError(f"corrupt predictor manifest {mpath}: {_one_line(exc)}") from None
    if not isinstance(manifest, dict):
        raise BenchError(f"corrupt predictor manifest {mpath}: a JSON object was expected, "
                         f"got {type(manifest).__name__}")
    fmt = manifest.get("format")
    if not _is_int(fmt) or fmt != FORMAT_VERSION:
        raise BenchError(f"{mpath}: unsupported predictor format {fmt!r}")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise BenchError(f"predictor manifest altered (its digest does not match): {mpath}")
    _check_fields(manifest, mpath)
    for m in manifest["members"]:
        for rel in m["models"]:
            _inside(path, rel)
    for rel, digest in manifest["files"].items():
        f = _inside(path, rel)
        if not f.is_file():
            raise BenchError(f"predictor file missing: {f}")
        if file_sha256(f) != digest:
            raise BenchError(f"predictor file altered (checksum mismatch): {f}")
    listed = set(manifest["files"])
    for f in path.rglob("*"):
        if f.is_dir() and not f.is_symlink():
            continue
        rel = f.relative_to(path).as_posix()
        if rel == MANIFEST:    # only the top-level manifest is not in its own list
            continue
        if rel not in listed or f.is_symlink() or not f.is_file():
            raise BenchError(f"unexpected file in predictor (not in manifest): {f}")
    _check_candidate_files(path, manifest)
    if manifest.get("conformal") is not None:   # core.conformal checks its own state
        try:
            ConformalSets.from_dict(manifest["conformal"], None)   # classes: when loading
        except BenchError as exc:
            raise BenchError(f"bad predictor manifest {mpath}: {exc}") from None
    return manifest


def _load_member(path: Path, name: str, j: int, rel: str, k: int, image_size: int):
    where = f"predictor {path}: cannot load member {name} model {j}"
    try:
        kind = json.loads((path / rel / CANDIDATE_FILE).read_text())["type"]
        cls = registry.get(kind)
        if not (isinstance(cls, type) and issubclass(cls, Candidate)):
            raise BenchError(f"'{kind}' is not a candidate type")
        cand = load_candidate(path / rel)
        cand.check_loaded(k, image_size)   # the candidate checks its own loaded state
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to load is a bad predictor
        raise BenchError(f"{where}: {_one_line(exc)}") from None
    return cand


def _load_ensemble(path: Path, info: dict, n_members: int, k: int):
    """The ensemble from its JSON state, checked on one uniform input: it must combine
    ``n_members`` members of ``k`` classes into probabilities."""
    where = f"predictor {path}: cannot load ensemble '{info['name']}' ({info['type']})"
    try:
        cls = registry.get(info["type"])
        if not (isinstance(cls, type) and issubclass(cls, Ensemble)):
            raise BenchError(f"'{info['type']}' is not an ensemble type")
        ensemble = cls(**info["params"]).set_state(info["state"])
        probe = np.asarray(ensemble.combine([np.full((2, k), 1.0 / k)] * n_members),
                           dtype=np.float64)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure is a bad state
        raise BenchError(f"{where}: {_one_line(exc)}") from None
    if probe.shape != (2, k) or not np.isfinite(probe).all() or probe.min() < -1e-6 \
            or not np.allclose(probe.sum(axis=1), 1.0, atol=1e-4):
        raise BenchError(f"{where}: its state does not turn {n_members} members' "
                         f"probabilities of {k} classes into {k} class probabilities")
    return ensemble


def load_predictor(path) -> Predictor:
    """Load and verify a saved predictor (see the module docstring). Any defect is one
    :class:`BenchError` naming the predictor and the part that failed."""
    path = Path(path)
    manifest = verify_predictor(path)
    k = len(manifest["classes"])
    size = resolve_preprocessing(manifest).image_size
    members = {m["name"]: [_load_member(path, m["name"], j, rel, k, size)
                           for j, rel in enumerate(m["models"])]
               for m in manifest["members"]}
    ensemble = _load_ensemble(path, manifest["ensemble"], len(members), k)
    return Predictor(manifest, members, ensemble, path)
