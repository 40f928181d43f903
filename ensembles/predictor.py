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
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from core import registry
from core.calibration import apply_temperature
from core.candidate import load_candidate
from core.errors import BenchError
from core.images import Preprocessing, as_items, resolve_preprocessing
from core.io import _json_default, atomic_write_json, file_sha256, package_versions, staged

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Images per call of the fused Keras graph. Larger calls buy no speed on CPU and cost memory
# (quick PBC predictor with a 224-px backbone: peak 3.9 GiB at 128, 5.9 GiB at 256).
FUSED_BATCH = 128


def _fusable(cand) -> bool:
    """A fold model the fused graph can run: it declares ``fused_inference`` (its
    ``predict_proba`` is its Keras model's softmax) and holds a loaded model."""
    return bool(cand.fused_inference) and hasattr(cand, "model_")


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
        self._fused_names = [n for n in self.member_names_
                             if all(_fusable(c) for c in members[n])]
        self._fused = None

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
                p = self.ensemble_.combine(self.member_probas(images))
                t = (self.manifest.get("calibration") or {}).get("temperature")   # [predictor]
                if t:   # temperature_scaling: T fitted on the ensemble's out-of-fold probabilities
                    p = apply_temperature(p, float(t))
                chunks.append(p)
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes_)))

    def predict(self, x, batch_size: int = 256) -> np.ndarray:
        """Class names of the most probable class."""
        return self.classes_[np.argmax(self.predict_proba(x, batch_size), axis=1)]

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
                   extra: dict | None = None) -> Path:
    """Write a predictor directory (atomically: a temp dir moved into place).

    ``members`` maps a member name to its saved fold-model folders; ``preprocessing`` is
    the record of how the training images were made, stored for :class:`Predictor`.
    """
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
        raise BenchError(f"predictor manifest points outside its folder: {rel}")
    return f


def verify_predictor(path) -> dict:
    """Check the manifest's own digest and every file against its sha256 (a missing,
    altered or unlisted file is refused); return the manifest. Loads no model."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BenchError(f"not a predictor directory (no {MANIFEST}): {path}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise BenchError(f"corrupt predictor manifest {mpath}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise BenchError(f"{mpath}: unsupported predictor format {fmt}")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise BenchError(f"predictor manifest altered (its digest does not match): {mpath}")
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
        if f.is_file() and f.name != MANIFEST and f.relative_to(path).as_posix() not in listed:
            raise BenchError(f"unexpected file in predictor (not in manifest): {f}")
    return manifest


def load_predictor(path) -> Predictor:
    """Load and verify a saved predictor (see the module docstring)."""
    path = Path(path)
    manifest = verify_predictor(path)
    members = {m["name"]: [load_candidate(path / rel) for rel in m["models"]]
               for m in manifest["members"]}
    ens_info = manifest["ensemble"]
    ensemble = registry.get(ens_info["type"])(**ens_info["params"]).set_state(ens_info["state"])
    return Predictor(manifest, members, ensemble, path)
