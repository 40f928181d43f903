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

import numpy as np

from core import registry
from core.calibration import apply_temperature
from core.conformal import ConformalSets, join_set, review_of
from core.candidate import CANDIDATE_FILE, Candidate, load_candidate
from core.errors import BenchError
from core.images import Preprocessing, as_items, resolve_preprocessing
from core.shift import ShiftReference
from ensembles.bags import make_aggregator, negative_label
from ensembles.base import Ensemble
from ensembles.model_card import CARD, model_card
from core.io import (_json_default, atomic_write_json, atomic_write_text, file_sha256,
                     package_versions, staged)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Images per call of the fused Keras graph. Larger calls buy no speed on CPU and cost memory
# (quick PBC predictor with a 224-px backbone: peak 3.9 GiB at 128, 5.9 GiB at 256).
FUSED_BATCH = 128
#: test-time augmentation: ``[predictor] tta`` -> the views averaged (each a function of an
#: (N, S, S, 3) batch). "flips": the image and its horizontal, vertical and double flips;
#: "d4": also the transposes (all 8 flips and 90-degree rotations).
TTA_VIEWS = {
    "none": ("identity",),
    "flips": ("identity", "flip_h", "flip_v", "rot180"),
    "d4": ("identity", "flip_h", "flip_v", "rot180", "transpose", "rot90", "rot270",
           "anti_transpose"),
}
_VIEW = {
    "identity": lambda x: x,
    "flip_h": lambda x: x[:, :, ::-1],
    "flip_v": lambda x: x[:, ::-1],
    "rot180": lambda x: x[:, ::-1, ::-1],
    "transpose": lambda x: x.transpose(0, 2, 1, 3),
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "anti_transpose": lambda x: x[:, ::-1, ::-1].transpose(0, 2, 1, 3),
}


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

    def member_probas(self, images: np.ndarray) -> list[np.ndarray]:
        """Each member's probabilities (mean over its fold models) for (N, S, S, 3) images."""
        out = {}
        if self._fused_names and len(images):
            fn = self._fused_fn()
            stacked = np.concatenate([fn(images[i:i + FUSED_BATCH]).numpy()   # (models, N, K)
                                      for i in range(0, len(images), FUSED_BATCH)],
                                     axis=1).astype(np.float64)
            i = 0
            for n in self._fused_names:
                k = len(self.members_[n])
                out[n] = stacked[i:i + k].mean(axis=0)
                i += k
        for n in self.member_names_:
            if n not in out:
                out[n] = np.mean([m.predict_proba(images) for m in self.members_[n]], axis=0)
        return [out[n] for n in self.member_names_]

    def predict_proba(self, x, batch_size: int = 256) -> np.ndarray:
        """Class probabilities (N, n_classes) for image paths or ``uint8`` arrays of any
        size; images are read and resized one batch at a time, each only once (files: the
        next batch is read while the current one is classified)."""
        if isinstance(x, np.ndarray) and x.ndim == 4 and x.shape[1:3] == (self.image_size,) * 2:
            items = x
        else:
            items = as_items(x)
        prep = self.preprocessing.apply_batch
        starts = list(range(0, len(items), batch_size))
        chunks = []
        with ThreadPoolExecutor(1) as reader:
            pending = reader.submit(prep, items[:batch_size])
            for i in starts:
                images = pending.result()
                if i + batch_size < len(items):
                    pending = reader.submit(prep, items[i + batch_size:i + 2 * batch_size])
                p = self.proba_of_images(images)
                t = (self.manifest.get("calibration") or {}).get("temperature")   # [predictor]
                if t:   # temperature_scaling: T fitted on the ensemble's out-of-fold probabilities
                    p = apply_temperature(p, float(t))
                chunks.append(p)
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes_)))

    def proba_of_images(self, images: np.ndarray) -> np.ndarray:
        """The ensemble's probabilities for preprocessed (N, S, S, 3) images, averaged over
        the test-time views of ``[predictor] tta`` (before any temperature)."""
        views = TTA_VIEWS[self.tta]
        return np.mean([self.ensemble_.combine(self.member_probas(
            np.ascontiguousarray(_VIEW[v](images)))) for v in views], axis=0)

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
        proba = self.predict_proba(x, batch_size)
        shift = self.shift_scores(x, batch_size)
        rv = review_of(self.conformal_, self.manifest["conformal"].get("review") or {}, proba,
                       shift)
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
        """A bag task's settings (positive class, aggregator, threshold), else ``None``."""
        return self.manifest.get("bags")

    def predict_bags(self, bags: dict, batch_size: int = 256) -> list[dict]:
        """One diagnosis per bag (patient) from its cells, for a predictor saved by a bag
        task (``[data] bags = true``).

        ``bags``: ``{name: image paths or uint8 arrays}``. Returns one dict per bag:
        ``bag``, ``n_cells``, ``probability`` (the stored aggregator over the cells'
        probabilities of the positive class), ``decision`` (positive when the probability
        reaches the stored threshold), ``threshold``, and ``cells`` (each cell's
        probabilities, (n, n_classes)).
        """
        spec = self.bag_task_
        if spec is None:
            raise BenchError(f"predictor {self.path} was not trained on a bag task "
                             "([data] bags = true): it classifies single images")
        agg = make_aggregator(spec["aggregator"], spec.get("params", {}))
        classes = [str(c) for c in self.classes_]
        pos = classes.index(spec["positive"])
        negative = negative_label(classes, spec["positive"])
        out = []
        for name, items in bags.items():
            proba = self.predict_proba(items, batch_size)
            if not len(proba):
                raise BenchError(f"bag '{name}' has no images")
            score = agg.score_bag(proba[:, pos])
            out.append({"bag": name, "n_cells": int(len(proba)), "probability": score,
                        "decision": spec["positive"] if score >= spec["threshold"] else negative,
                        "threshold": float(spec["threshold"]), "cells": proba,
                        **_refer(spec, score, self.shift_scores(items, batch_size))})
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


def _refer(spec: dict, score: float, shift) -> dict:
    """``refer``: the bag's score lies in the stored band where out-of-fold patients were
    misclassified, or its cells are flagged as shifted (core.shift's batch rule)."""
    band = spec.get("refer_band")
    if not band:
        return {}
    shifted = shift is not None and ShiftReference.batch_summary(shift)["flagged"]
    return {"refer": bool(band["lo"] <= score <= band["hi"] or shifted),
            "cells_shifted": bool(shifted)}


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
    manifest = json.loads(json.dumps(manifest, default=_json_default))
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
    if not f.is_relative_to(root.resolve()):
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


def _check_fields(manifest: dict, mpath: Path) -> None:
    """The manifest's fields have the types a predictor needs (a manifest whose digest
    was recomputed after an edit is refused here with one line, not a traceback later)."""
    def need(ok, what):
        if not ok:
            raise BenchError(f"bad predictor manifest {mpath}: {what}")

    files = manifest.get("files")
    need(isinstance(files, dict) and all(isinstance(k, str) and k and isinstance(v, str)
                                         for k, v in files.items()),
         "'files' must be an object of path: sha256 strings")
    classes = manifest.get("classes")
    need(isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes),
         "'classes' must be a non-empty list of class names")
    need(len(set(classes)) == len(classes), "'classes' lists a class twice")
    members = manifest.get("members")
    need(isinstance(members, list) and members, "'members' must be a non-empty list")
    names = set()
    for i, m in enumerate(members):
        need(isinstance(m, dict), f"member {i} must be an object")
        name = m.get("name")
        need(isinstance(name, str) and name, f"member {i}: 'name' must be a non-empty string")
        need(name not in names, f"member '{name}' is listed twice")
        names.add(name)
        models = m.get("models")
        need(isinstance(models, list) and models
             and all(isinstance(r, str) and r for r in models),
             f"member '{name}': 'models' must be a non-empty list of folders")
        for key in ("type", "kind"):
            need(m.get(key) is None or isinstance(m[key], str),
                 f"member '{name}': '{key}' must be a string")
        need(m.get("weight") is None or _is_number(m["weight"]),
             f"member '{name}': 'weight' must be a number")
    ens = manifest.get("ensemble")
    need(isinstance(ens, dict), "'ensemble' must be an object")
    for key, typ, word in (("name", str, "a string"), ("type", str, "a string"),
                           ("params", dict, "an object"), ("state", dict, "an object")):
        need(isinstance(ens.get(key), typ), f"ensemble '{key}' must be {word}")
    size = manifest.get("image_size")
    need(size is None or (_is_int(size) and size > 0), "'image_size' must be a positive integer")
    bags = manifest.get("bags")
    if bags is not None:
        need(isinstance(bags, dict), "'bags' must be an object")
        need(bags.get("positive") in classes, "bags 'positive' must be one of 'classes'")
        need(bags.get("aggregator") in ("mean", "trimmed_mean", "top_k_mean"),
             "bags 'aggregator' must be mean, trimmed_mean or top_k_mean")
        need(isinstance(bags.get("params", {}), dict), "bags 'params' must be an object")
        need(_is_number(bags.get("threshold")), "bags 'threshold' must be a number")
    need(size is not None or isinstance(manifest.get("preprocessing"), dict),
         "'image_size' is missing")
    try:
        prep = resolve_preprocessing(manifest)
    except Exception as exc:  # noqa: BLE001 - any failure is a bad record
        need(False, _one_line(exc))
    need(size is None or prep.image_size == size,
         f"'image_size' {size} differs from the preprocessing's {prep.image_size}")
    for key in ("created", "chosen_by", "member_models"):
        need(manifest.get(key) is None or isinstance(manifest[key], str),
             f"'{key}' must be a string")
    for key in ("training_data", "versions"):
        need(manifest.get(key) is None or isinstance(manifest[key], dict),
             f"'{key}' must be an object")
    board = manifest.get("leaderboard")
    need(board is None or (isinstance(board, dict) and all(_is_number(v) for v in board.values())),
         "'leaderboard' must be an object of numbers")
    cal = manifest.get("calibration")
    need(cal is None or isinstance(cal, dict), "'calibration' must be an object")
    t = (cal or {}).get("temperature")
    need(t is None or (_is_number(t) and t >= 0),
         "calibration 'temperature' must be a non-negative number")
    need(manifest.get("tta", "none") in TTA_VIEWS, f"'tta' must be one of {sorted(TTA_VIEWS)}")
    shift = manifest.get("shift")
    if shift is not None:
        try:
            ref = ShiftReference.from_dict(shift)
            ok = ref.precision.shape == (len(ref.mean),) * 2 and len(ref.reference) > 1 \
                and np.isfinite(ref.precision).all()
        except (TypeError, ValueError, KeyError, AttributeError):
            ok = False
        need(ok, "'shift' is not a valid description of the training images")


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
