"""The saved ensemble predictor: what users keep after a benchmark, loaded and run.

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

The manifest's typed record and its verification are :mod:`ensembles.record`, the writer
:mod:`ensembles.writer`; this module is the runtime (:class:`Predictor`,
:func:`load_predictor`) and re-exports the names the others are used by.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from core import registry
from core import recalibrate
from core.batch import batch_check
from core.calibration import apply_temperature
from core.candidate import CANDIDATE_FILE, Candidate, load_candidate
from core.colour import bag_colour
from core.conformal import join_set, review_of
from core.labhead import LabHead
from core.errors import BenchError
from core.images import as_items
from core.io import safe_text
from core.progress import progress_iter
from ensembles.bags import call_bag
from ensembles.celltypes import one_hot_types
from ensembles.base import Ensemble
from ensembles.overlay import gradcam_names, write_gradcam_png
from ensembles.record import (
    MANIFEST,
    NO_BAG_COLOUR,
    BagTask,
    PredictorRecord,
    manifest_digest,
    one_line,
    verify_predictor,
)
from ensembles.tta import TTA_VIEWS, VIEWS
from ensembles.writer import save_predictor

# Images per call of the fused Keras graph. Larger calls buy no speed on CPU and cost memory
# (quick PBC predictor with a 224-px backbone: peak 3.9 GiB at 128, 5.9 GiB at 256).
FUSED_BATCH = 128
#: the first columns of ``bench predict``'s table (:meth:`Predictor.table_header`)
TABLE_COLUMNS = ("path", "prediction", "confidence")


#: the review flags of :func:`core.conformal.review_flags`, as ``review_reason`` names them
REVIEW_REASONS = ("set_not_one", "low_confidence", "shifted")


class TableBatch(NamedTuple):
    """One batch of ``bench predict``'s table (:meth:`Predictor.predict_table`)."""

    rows: list  # the CSV rows of the batch's readable images
    errors: list  # ``(position, exception)`` of its unreadable files
    shift: object  # the readable images' shift scores (None without a reference)
    review: object  # their prediction sets and review flags (None without stored sets)
    table: list  # every file's row in the batch's order: ``rows`` and one per unreadable file
    proba: object = None  # the readable images' probabilities (N, K), in ``rows`` order


def fused_outputs(plan, x) -> list:
    """Each fused fold model's ``float32`` probabilities for the batch ``x`` (a tensor), in
    ``plan`` order (``(trunk_key, trunk, head layers)``, :meth:`Predictor._fused_plan`):
    models with the same trunk key share one pass of it."""
    import tensorflow as tf

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
    return outs


class Predictor:
    """A loaded ensemble predictor. Use :func:`load_predictor`.

    Attributes
    ----------
    record : the manifest's :class:`ensembles.record.PredictorRecord`.
    classes_ : array of class names.
    preprocessing : the :class:`core.images.Preprocessing` record of the manifest; every
        input goes through it, as the training images did, unless it is passed as model
        input (``preprocessed=True``).
    image_size : side of the square images the members were trained on.
    member_names_ : members in the ensemble's order.
    member_kinds_ : ``{name: "cnn" | "baseline"}``.
    """

    def __init__(self, record: PredictorRecord, members: dict[str, list], ensemble, path: Path):
        if isinstance(record, dict):  # a run's fold models, never saved (bench.protocols.external)
            record = PredictorRecord.unverified(record)
        self.record = record
        self.members_ = members
        self.ensemble_ = ensemble
        self.path = path
        self.classes_ = np.array(record.classes)
        self.preprocessing = record.prep
        self.image_size = self.preprocessing.image_size
        self.member_names_ = [m.name for m in record.members]
        self.member_kinds_ = {m.name: m.kind or members[m.name][0].kind for m in record.members}
        # Keras members run as one compiled TensorFlow graph per batch: every fold model of
        # every such member on the same input tensor (traced once, any batch size). Frozen
        # backbones with identical weights (the fold models of a frozen-transfer member)
        # run once per batch, each fold model adding only its head.
        self._fused_names = [
            n
            for n in self.member_names_  # declared: model -> softmax
            if all(c.fused_inference for c in members[n])
        ]
        self._fused = None
        self.tta = record.tta
        self.shift_reference_ = record.shift.reference if record.shift else None
        # bench adapt --n: a new lab's labelled cells (core.labhead; an older predictor's
        # record holds an output recalibration's temperature and bias only)
        self.label_adaptation_ = (record.model_extra or {}).get("label_adaptation")
        la = self.label_adaptation_
        self.lab_head_ = None
        if la and la.get("head"):
            if la["head"] not in record.files:  # only a checksummed file of the predictor
                raise BenchError(f"predictor {path}: its lab head {la['head']!r} is not listed")
            self.lab_head_ = LabHead.load(path / la["head"])
        cp = record.conformal  # prediction sets and review rule (core.conformal)
        try:
            self.conformal_ = cp.sets(len(self.classes_)) if cp else None
            counts = {len(members[n]) for n in self.member_names_}
            need = self.conformal_.n_folds if self.conformal_ is not None else None
            if need is not None and counts != {need}:
                raise BenchError(
                    f"its cross-conformal sets need {need} fold models per "
                    f"member, the members have {sorted(counts)}"
                )
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
                return tf.stack(fused_outputs(plan, x))

            self._fused = run
        return self._fused

    def member_fold_probas(self, images: np.ndarray) -> list[np.ndarray]:
        """Each member's probabilities per fold model, (n_folds, N, K) each, for
        (N, S, S, 3) images."""
        out = {}
        if self._fused_names and len(images):
            fn = self._fused_fn()
            stacked = np.concatenate(
                [
                    fn(images[i : i + FUSED_BATCH]).numpy()  # (models, N, K)
                    for i in range(0, len(images), FUSED_BATCH)
                ],
                axis=1,
            ).astype(np.float64)
            i = 0
            for n in self._fused_names:
                k = len(self.members_[n])
                out[n] = stacked[i : i + k]
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
        """The per-bag colour normalisation a bag task was trained with."""
        return self.record.bag_colour

    def predict_proba(
        self,
        x,
        batch_size: int = 256,
        folds: bool = False,
        one_bag: bool = False,
        preprocessed: bool = False,
    ):
        """Class probabilities (N, n_classes) for image paths or ``uint8`` arrays of any
        size, each through the predictor's :attr:`preprocessing` (an array at the model's
        size too); ``preprocessed``: ``x`` is model input already (an (N, S, S, 3)
        ``uint8`` array, as :meth:`core.images.Preprocessing.load` gives it), used as it
        is. Images are read and resized one batch at a time, each only once (files: the
        next batch is read while the current one is classified). With ``folds``:
        ``(proba, fold_proba)``, the second (n_folds, N, n_classes), the ensemble as each
        fold's models make it (for cross-conformal sets).

        A bag task trained with ``[patients] bag_colour`` normalises the colour of a bag's
        cells together (:func:`core.colour.bag_colour`): :meth:`predict_bags` does it per
        bag; here ``x`` is read whole and normalised as one bag (``one_bag``: ``x`` is
        model input already normalised so, as :meth:`load_bag` gives it)."""
        preprocessed = preprocessed or one_bag
        items = self.preprocessing.batch_items(x, preprocessed)
        if not one_bag and self.bag_colour_ != NO_BAG_COLOUR:
            items = self.normalise_bag(self.preprocessing.apply_batch(items, preprocessed))
            preprocessed = True

        def prep(chunk):
            return self.preprocessing.apply_batch(chunk, preprocessed)

        starts = list(range(0, len(items), batch_size))
        chunks, fold_chunks = [], []
        with ThreadPoolExecutor(1) as reader:
            pending = reader.submit(prep, items[:batch_size])
            for i in starts:
                images = pending.result()
                if i + batch_size < len(items):
                    pending = reader.submit(prep, items[i + batch_size : i + 2 * batch_size])
                p, pf = (
                    self.proba_of_images(images, folds=True)
                    if folds
                    else (self.proba_of_images(images), None)
                )
                feats = self.lab_head_features(images)
                chunks.append(self._temper(p, feats))
                if folds:
                    fold_chunks.append(self._temper(pf, feats))
        k = len(self.classes_)
        proba = np.concatenate(chunks) if chunks else np.zeros((0, k))
        if not folds:
            return proba
        return proba, (
            np.concatenate(fold_chunks, axis=1) if fold_chunks else np.zeros((self.n_folds_, 0, k))
        )

    def lab_head_features(self, images: np.ndarray) -> np.ndarray | None:
        """The features the lab head reads of preprocessed ``images`` (``None`` when the
        predictor has no lab head, or one without a feature map)."""
        head = self.lab_head_
        if head is None or not head.uses_features or not len(images):
            return None
        return head.features_of(np.asarray(images))

    def _temper(self, p: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        t = self.record.temperature  # [predictor] temperature_scaling: T fitted on the
        p = apply_temperature(p, float(t)) if t else p  # ensemble's out-of-fold rows
        if self.lab_head_ is not None:  # bench adapt --n: a new lab's labelled cells
            return self.lab_head_.apply(p, features)
        la = self.label_adaptation_  # an older predictor's output recalibration
        return recalibrate.apply(p, la["temperature"], la["bias"]) if la else p

    @property
    def n_folds_(self) -> int:
        """How many fold models each member has (the cross-validation's folds)."""
        return len(self.members_[self.member_names_[0]])

    def predict_batches(
        self,
        items,
        batch_size: int,
        *,
        keep_full: bool = False,
        desc: str = "predicting",
        show: bool = True,
    ):
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
        for s, X, full, good, errs in progress_iter(
            batches, total=n_batches, desc=desc, enabled=show and n_batches > 1
        ):
            rows = s + np.asarray(good, dtype=np.int64)
            proba = pf = None
            if len(rows):
                out = self.predict_proba(X, batch_size=len(X), folds=folds, preprocessed=True)
                proba, pf = out if folds else (out, None)
            yield rows, X, full, proba, [(s + j, exc) for j, exc in errs], pf

    def proba_of_images(self, images: np.ndarray, folds: bool = False):
        """The ensemble's probabilities for preprocessed (N, S, S, 3) images, averaged over
        the test-time views of ``[predictor] tta`` (before any temperature). With
        ``folds``: ``(proba, fold_proba)``, the second the ensemble of each fold's models
        (n_folds, N, K), from the same model outputs."""
        views = TTA_VIEWS[self.tta]
        per_view = [self.member_fold_probas(np.ascontiguousarray(VIEWS[v](images))) for v in views]
        proba = np.mean(
            [self.ensemble_.combine([m.mean(axis=0) for m in mp]) for mp in per_view], axis=0
        )
        if not folds:
            return proba
        fold_proba = np.stack(
            [
                np.mean([self.ensemble_.combine([m[k] for m in mp]) for mp in per_view], axis=0)
                for k in range(self.n_folds_)
            ]
        )
        return proba, fold_proba

    def adapt(self, x, max_images: int = 2000, seed: int = 0, preprocessed: bool = False) -> dict:
        """Unsupervised test-time adaptation (AdaBN) of the members that declare
        ``adaptable`` on a seeded sample of at most ``max_images`` of ``x`` (no labels;
        ``preprocessed`` as in :meth:`predict_proba`). Changes this loaded predictor only,
        never its files. Returns what was done."""
        items = self.preprocessing.batch_items(x, preprocessed)
        rows = np.arange(len(items))
        if len(rows) > max_images:
            rows = np.sort(np.random.default_rng(seed).choice(rows, max_images, replace=False))
        X = self.preprocessing.apply_batch(
            items[rows] if preprocessed else [items[i] for i in rows], preprocessed
        )
        layers, models = 0, 0
        for n in self.member_names_:
            for m in self.members_[n]:
                if m.adaptable:
                    layers += m.adapt(X)
                    models += 1
        self._fused = None  # the fused graph holds the old statistics
        return {
            "method": "AdaBN (batch-norm statistics re-estimated on the new images)",
            "images": int(len(X)),
            "fold_models": models,
            "layers": layers,
        }

    def batch_check(self, proba) -> dict | None:
        """The batch-level warning (:func:`core.batch.batch_check`) of this predictor's
        probabilities ``proba`` for one batch of cells: ``None`` for predictors saved
        without a reference or a batch too small to judge."""
        extra = self.record.model_extra or {}
        ref = extra.get("batch_reference")
        return batch_check(proba, ref, adapted="adaptation" in extra) if ref else None

    def shift_scores(self, x, batch_size: int = 256, preprocessed: bool = False) -> np.ndarray:
        """Per image, how far its colours lie from the training images' (0-1: the share of
        training images closer to their mean; see :mod:`core.shift`; ``preprocessed`` as in
        :meth:`predict_proba`). ``None`` for predictors saved without a description of
        their training images."""
        if self.shift_reference_ is None:
            return None
        items = self.preprocessing.batch_items(x, preprocessed)
        return (
            np.concatenate(
                [
                    self.shift_reference_.score(
                        self.preprocessing.apply_batch(items[i : i + batch_size], preprocessed)
                    )
                    for i in range(0, len(items), batch_size)
                ]
            )
            if len(items)
            else np.zeros(0)
        )

    def _review(self, proba, shift, fold_proba) -> dict | None:
        """The stored prediction sets and review flags (:func:`core.conformal.review_of`) of
        images with these probabilities and shift scores; ``None`` without stored sets."""
        if self.conformal_ is None:
            return None
        return review_of(self.conformal_, self.record.conformal.review, proba, shift, fold_proba)

    def predict_review(self, x, batch_size: int = 256, preprocessed: bool = False) -> dict:
        """What ``bench predict`` writes per image (:meth:`predict_table`): ``prediction``,
        ``confidence``, ``prediction_set`` (classes joined by ``|``), ``set_size``,
        ``review`` (set size other than one, shift score beyond the stored limit, or
        confidence below the stored threshold), the reasons, ``shift_score`` and
        ``proba``."""
        if self.conformal_ is None:
            raise BenchError(
                f"predictor {self.path} was saved without conformal prediction "
                "sets; run it again, or bench calibrate it on labelled images"
            )
        out = self.predict_proba(
            x, batch_size, folds=self.needs_fold_proba_, preprocessed=preprocessed
        )
        proba, fold_proba = out if self.needs_fold_proba_ else (out, None)
        shift = self.shift_scores(x, batch_size, preprocessed)
        rv = self._review(proba, shift, fold_proba)
        return {
            "prediction": self.classes_[proba.argmax(axis=1)],
            "confidence": proba.max(axis=1),
            "prediction_set": [join_set(r, self.classes_) for r in rv.pop("sets")],
            **rv,
            "shift_score": shift,
            "proba": proba,
        }

    def table_header(self, gradcam: bool = False) -> list[str]:
        """The columns of ``bench predict``'s table (:meth:`predict_table`)."""
        return (
            [*TABLE_COLUMNS, *self.classes_]
            + (["shift_score"] if self.shift_reference_ is not None else [])
            + (["gradcam"] if gradcam else [])
            + (
                ["prediction_set", "set_size", "review", "review_reason", "in_set"]
                if self.conformal_
                else []
            )
            + ["error"]
        )

    def predict_table(
        self, paths, batch_size: int = 256, *, gradcam_dir=None, root=None, show: bool = True
    ):
        """``bench predict``'s table of the image files ``paths`` (columns:
        :meth:`table_header`), a :class:`TableBatch` per batch of ``batch_size``: per
        readable image its path, the prediction and its probability, every class's
        probability, the shift score, the Grad-CAM figure's name, the prediction set, its
        size, the review flag, why (``review_reason``: the flags of
        :data:`REVIEW_REASONS` joined by ``;``) and whether the prediction lies in its own
        set (``in_set``: class-wise sets calibrate each class's threshold apart, so the most
        probable class can miss its threshold while another class reaches its own) (each
        column the predictor has; the same numbers as :meth:`predict_review`); an
        unreadable file gets a row with only its path and ``error``. ``gradcam_dir``: write
        each image's Grad-CAM figure there (:func:`ensembles.overlay.write_gradcam_png`),
        named after its path under ``root`` (:func:`ensembles.overlay.gradcam_names`)."""
        cams_to = None if gradcam_dir is None else Path(gradcam_dir)
        names = gradcam_names(paths, root) if cams_to is not None else None
        ref = self.shift_reference_
        width = len(self.table_header(gradcam=cams_to is not None))

        def in_order(rows, good, errors) -> list:
            failed = [(i, [str(paths[i]), *[""] * (width - 2), str(exc)]) for i, exc in errors]
            return [r for _, r in sorted([*zip(good, rows), *failed], key=lambda t: t[0])]

        for good, X, full, proba, errors, fold_proba in self.predict_batches(
            paths, batch_size, keep_full=cams_to is not None, show=show
        ):
            if not len(good):
                yield TableBatch([], errors, None, None, in_order([], [], errors), proba)
                continue
            top = np.argmax(proba, axis=1)
            cams = None if cams_to is None else self.explain(X, class_index=top, preprocessed=True)
            shift = ref.score(X) if ref is not None else None
            rv = self._review(proba, shift, fold_proba)
            rows = []
            for j, (i, p) in enumerate(zip(good, proba)):
                k = int(top[j])
                extra = [f"{shift[j]:.4f}"] if shift is not None else []
                if cams_to is not None:
                    write_gradcam_png(
                        cams_to / names[i],
                        full[j],
                        cams[j],
                        p,
                        self.classes_,
                        title=safe_text(str(paths[i])),
                    )
                    extra.append(names[i])
                if rv is not None:
                    extra += [
                        join_set(rv["sets"][j], self.classes_),
                        int(rv["set_size"][j]),
                        int(rv["review"][j]),
                        ";".join(r for r in REVIEW_REASONS if rv[r][j]),
                        int(rv["sets"][j][k]),
                    ]
                rows.append(
                    [
                        str(paths[i]),
                        self.classes_[k],
                        f"{p[k]:.6f}",
                        *[f"{v:.6f}" for v in p],
                        *extra,
                        "",
                    ]
                )
            yield TableBatch(rows, errors, shift, rv, in_order(rows, good, errors), proba)

    def predict(self, x, batch_size: int = 256) -> np.ndarray:
        """Class names of the most probable class."""
        return self.classes_[np.argmax(self.predict_proba(x, batch_size), axis=1)]

    def score(self, x, y, sample_weight=None) -> float:
        """Mean accuracy of :meth:`predict` against the class names ``y`` (scikit-learn's
        classifier ``score``)."""
        from sklearn.metrics import accuracy_score

        y = np.asarray(y).astype(str)
        unknown = sorted(set(y) - set(self.classes_.astype(str)))
        if unknown:
            raise BenchError(
                f"score: labels {unknown[:5]} are not classes of this predictor "
                f"({list(self.classes_)})"
            )
        return float(accuracy_score(y, self.predict(x).astype(str), sample_weight=sample_weight))

    # scikit-learn reads a fitted classifier from these (is_classifier, get_tags): a
    # Predictor is loaded fitted; it is not refitted (no fit), so it is no estimator to clone
    _estimator_type = "classifier"

    def __sklearn_tags__(self):
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags

        return Tags(
            estimator_type="classifier",
            target_tags=TargetTags(required=True),
            classifier_tags=ClassifierTags(multi_class=len(self.classes_) > 2),
            input_tags=InputTags(two_d_array=False, three_d_array=True),
            requires_fit=False,
        )

    # -- bags (patients) ------------------------------------------------------------
    @property
    def bag_task_(self) -> BagTask | None:
        """A bag task's settings (:class:`ensembles.record.BagTask`: positive class,
        aggregator and its params, threshold, min_cells, ...), else ``None``."""
        return self.record.bags

    def normalise_bag(self, X: np.ndarray) -> np.ndarray:
        """One bag's preprocessed cells (N, S, S, 3) colour-normalised together as the bag
        task was trained (``[patients] bag_colour``); unchanged without it."""
        if self.bag_colour_ == NO_BAG_COLOUR or not len(X):
            return X
        return bag_colour(X, np.zeros(len(X)), self.bag_colour_)

    #: the bag task's cell-type model (a saved candidate), set by :func:`load_predictor`
    cell_type_model_ = None

    def cell_type_proba(self, X: np.ndarray, given=None) -> tuple[np.ndarray | None, str]:
        """A bag's cells' type probabilities for a bag task that reads cell types, and
        where they came from: ``given`` (the analyser's type of each cell, e.g. its folder
        name) when every cell has one of the task's types, else the stored cell-type
        model; ``(None, "")`` for a task over all cells."""
        stage = self.bag_task_.cell_types if self.bag_task_ is not None else None
        if stage is None or not len(X):
            return None, ""
        if given is not None:
            types = one_hot_types(given, stage.types)
            if types.sum(1).all():  # every cell of a known type
                return types, "given"
        return self.cell_type_model_.predict_proba(X), "model"

    def load_bag(self, items) -> tuple[np.ndarray, list, list]:
        """One bag's cells as model input: ``(X, ok, errors)`` as
        :meth:`core.images.Preprocessing.load` with ``skip_errors`` gives them (unreadable
        files skipped), ``X`` then normalised together (:meth:`normalise_bag`)."""
        X, _, ok, errors = self.preprocessing.load(items, skip_errors=True)
        return self.normalise_bag(X), ok, errors

    def predict_bags(self, bags: dict, batch_size: int = 256, cell_types=None) -> list[dict]:
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
        ``min_cells``, ``cells`` (each readable cell's probabilities, (n, n_classes)) and
        ``cell_types_from`` (a task that reads cell types: ``"given"`` or ``"model"``, see
        :meth:`cell_type_proba`; ``cell_types``: ``{bag: the type of each item}``, the
        analyser's, e.g. from its folder names).
        """
        spec = self.bag_task_
        if spec is None:
            raise BenchError(
                f"predictor {self.path} was not trained on a bag task "
                "([data] bags = true): it classifies single images"
            )
        classes = [str(c) for c in self.classes_]
        pos = classes.index(spec.positive)
        out = []
        for name, items in bags.items():
            items = as_items(items)
            if not len(items):  # a patient folder without images: its row says so
                score, decision, _ = call_bag(spec, classes, np.zeros(0), None)
                out.append(
                    {
                        "bag": name,
                        "n_cells": 0,
                        "n_skipped": 0,
                        "skipped": [],
                        "probability": score,
                        "decision": decision,
                        "reason": "no image file",
                        "threshold": float(spec.threshold),
                        "min_cells": spec.min_cells,
                        "cells": np.zeros((0, len(classes))),
                        "cell_items": [],
                        "cell_types_from": "",
                    }
                )
                continue
            X, ok, errors = self.load_bag(items)  # the bag's cells together
            skipped = [
                (f"array {i}" if isinstance(items[i], np.ndarray) else str(items[i]), str(exc))
                for i, exc in errors
            ]
            proba = (
                self.predict_proba(X, batch_size, one_bag=True)
                if len(ok)
                else np.zeros((0, len(classes)))
            )
            shift = (
                self.shift_reference_.score(X)
                if (self.shift_reference_ is not None and len(ok))
                else None
            )
            given = None
            if cell_types is not None and cell_types.get(name) is not None:
                given = [cell_types[name][i] for i in ok]
            type_p, types_from = self.cell_type_proba(X, given)
            score, decision, reason = call_bag(spec, classes, proba[:, pos], shift, type_p)
            out.append(
                {
                    "bag": name,
                    "n_cells": int(len(ok)),
                    "n_skipped": len(skipped),
                    "skipped": skipped,
                    "probability": score,
                    "decision": decision,
                    "reason": reason,
                    "threshold": float(spec.threshold),
                    "min_cells": spec.min_cells,
                    "cells": proba,
                    "cell_items": [items[i] for i in ok],
                    "cell_types_from": types_from,
                }
            )
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
        w = [w[self.member_names_.index(n)] for n in cnn] if w is not None else [1.0] * len(cnn)
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
            raise BenchError(
                f"class_index must be None, a class index or name, or {n} "
                f"indices, got {class_index!r}"
            )
        idx = np.broadcast_to(idx.astype(np.int64), (n,)).copy()
        if ((idx < 0) | (idx >= k)).any():
            raise BenchError(f"class_index must be in [0, {k}), got {class_index}")
        return idx

    def explain(
        self, x, class_index=None, batch_size: int = 64, preprocessed: bool = False
    ) -> np.ndarray:
        """The ensemble's Grad-CAM maps, (N, S, S) ``float32`` in [0, 1] at the training
        resolution ``S`` (upsample to show them on the original image; ``preprocessed`` as
        in :meth:`predict_proba`).

        A CNN member's map is the mean of its fold models' maps
        (``KerasCandidate.explain``); the ensemble's is their weighted mean
        (:meth:`explain_weights`). ``class_index``: ``None`` (each image's class predicted
        by the ensemble), a class index or name, or one index per image.
        """
        weights = self.explain_weights()
        items = self.preprocessing.batch_items(x, preprocessed)
        fixed = None if class_index is None else self._class_indices(class_index, len(items))
        maps = []
        for i in range(0, len(items), batch_size):
            images = self.preprocessing.apply_batch(items[i : i + batch_size], preprocessed)
            if fixed is None:
                target = np.argmax(self.ensemble_.combine(self.member_probas(images)), axis=1)
            else:
                target = fixed[i : i + batch_size]
            maps.append(self._explain_images(images, target, weights))
        s = self.image_size
        return np.concatenate(maps) if maps else np.zeros((0, s, s), np.float32)

    def _explain_images(self, images, target, weights) -> np.ndarray:
        out = np.zeros(images.shape[:3], dtype=np.float64)
        for n, w in weights.items():
            member = np.mean(
                [m.explain(images, class_index=target) for m in self.members_[n]], axis=0
            )
            out += w * member
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def __repr__(self):
        return (
            f"Predictor({self.record.ensemble.name}: {', '.join(self.member_names_)}; "
            f"classes={list(self.classes_)})"
        )


def _load_member(path: Path, name: str, j: int, rel: str, k: int, image_size: int):
    where = f"predictor {path}: cannot load member {name} model {j}"
    try:
        kind = json.loads((path / rel / CANDIDATE_FILE).read_text())["type"]
        cls = registry.get(kind)
        if not (isinstance(cls, type) and issubclass(cls, Candidate)):
            raise BenchError(f"'{kind}' is not a candidate type")
        cand = load_candidate(path / rel)
        cand.check_loaded(k, image_size)  # the candidate checks its own loaded state
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to load is a bad predictor
        raise BenchError(f"{where}: {one_line(exc)}") from None
    return cand


def _load_ensemble(path: Path, info, n_members: int, k: int):
    """The ensemble from its JSON state (``info``: the record's
    :class:`ensembles.record.EnsembleRecord`), checked on one uniform input: it must
    combine ``n_members`` members of ``k`` classes into probabilities."""
    where = f"predictor {path}: cannot load ensemble '{info.name}' ({info.type})"
    try:
        cls = registry.get(info.type)
        if not (isinstance(cls, type) and issubclass(cls, Ensemble)):
            raise BenchError(f"'{info.type}' is not an ensemble type")
        ensemble = cls(**info.params).set_state(info.state)
        probe = np.asarray(
            ensemble.combine([np.full((2, k), 1.0 / k)] * n_members), dtype=np.float64
        )
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure is a bad state
        raise BenchError(f"{where}: {one_line(exc)}") from None
    if (
        probe.shape != (2, k)
        or not np.isfinite(probe).all()
        or probe.min() < -1e-6
        or not np.allclose(probe.sum(axis=1), 1.0, atol=1e-4)
    ):
        raise BenchError(
            f"{where}: its state does not turn {n_members} members' "
            f"probabilities of {k} classes into {k} class probabilities"
        )
    return ensemble


def load_predictor(path) -> Predictor:
    """Load and verify a saved predictor (see the module docstring). Any defect is one
    :class:`BenchError` naming the predictor and the part that failed."""
    path = Path(path)
    record = verify_predictor(path)
    k = len(record.classes)
    size = record.prep.image_size
    members = {
        m.name: [_load_member(path, m.name, j, rel, k, size) for j, rel in enumerate(m.models)]
        for m in record.members
    }
    ensemble = _load_ensemble(path, record.ensemble, len(members), k)
    pred = Predictor(record, members, ensemble, path)
    stage = record.bags.cell_types if record.bags is not None else None
    if stage is not None:
        where = f"predictor {path}: cannot load the bag task's cell-type stage"
        try:
            stage.load(path)
            pred.cell_type_model_ = _load_member(
                path, "cell types", 0, stage.model, len(stage.types), size
            )
        except BenchError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to load is a bad predictor
            raise BenchError(f"{where}: {one_line(exc)}") from None
    return pred


__all__ = [
    "Predictor",
    "TableBatch",
    "TABLE_COLUMNS",
    "load_predictor",
    "verify_predictor",
    "save_predictor",
    "manifest_digest",
    "MANIFEST",
    "PredictorRecord",
    "BagTask",
]
