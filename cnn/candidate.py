"""CNN candidates."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from core.candidate import Candidate
from core.errors import BenchError
from core.registry import register
from cnn.gradcam import gradcam, randomized_clone
from cnn.train import fit_keras, predict_keras
from cnn.runtime import configure, set_seeds

MODEL_FILE = "model.keras"
#: parameter rules shared by every Keras candidate (see core.params)
TRAIN_RULES = {
    "optimizer": {"choices": ["adam", "adamw", "sgd"]},
    "learning_rate": {"gt": 0},
    "batch_size": {"ge": 1},
    "epochs": {"ge": 0},
    "patience": {"ge": 0},
    "schedule": {"choices": ["plateau", "cosine"]},
    "class_weight": {"choices": ["balanced"], "none": True},
    "val_fraction": {"gt": 0, "lt": 1},
    "seed": {"ge": 0},
    "verbose": {"ge": 0},
    "dropout": {"ge": 0, "lt": 1},
    "dense_units": {"ge": 0},
    "input_size": {"type": int, "ge": 8, "le": 1024, "none": True},
    "augment": {"type": Any, "none": True},
    "crop": {"gt": 0, "le": 1},
}


class KerasCandidate(Candidate):
    """Shared fit/predict/save for candidates backed by one ``keras.Model``."""

    kind = "cnn"
    fit_accepts = frozenset({"classes", "workdir", "epoch_callbacks"})
    explainable = True
    fused_inference = True
    adaptable = True
    ema = 0.0  # weight averaging (a parameter of ScratchCNN); the others train without

    def _build(self, image_size: int, n_classes: int):  # pragma: no cover - interface
        raise NotImplementedError

    def _split_validation(self, X, y, X_val, y_val, labels=None):
        """``(X, y, X_val, y_val)``: the given validation rows, else a seeded split of the
        training rows stratified by ``labels`` (default ``y``; ``y`` may be soft targets,
        :meth:`_targets`). With soft targets, given integer ``y_val`` become one-hot."""
        if X_val is not None:
            if np.ndim(y) == 2 and np.ndim(y_val) == 1:
                y_val = np.eye(y.shape[1], dtype=np.float32)[y_val]
            return X, y, X_val, y_val
        labels = y if labels is None else labels
        _, counts = np.unique(labels, return_counts=True)
        n_val = int(np.ceil(self.val_fraction * len(labels)))
        # stratify when every class can be on both sides (tiny sets: a plain split)
        strat = (
            labels
            if counts.min() >= 2 and len(counts) <= n_val <= len(labels) - len(counts)
            else None
        )
        Xt, Xv, yt, yv = train_test_split(
            X, y, test_size=self.val_fraction, stratify=strat, random_state=self.seed
        )
        return Xt, yt, Xv, yv

    def _targets(self, y: np.ndarray, soft_targets) -> np.ndarray:
        """What the network learns: the integer labels ``y``, or ``soft_targets`` (one row
        of class probabilities per training row, columns in the order of ``classes_``)."""
        if soft_targets is None:
            return y
        t = np.asarray(soft_targets, dtype=np.float32)
        if t.shape != (len(y), self.n_classes_):
            raise BenchError(
                f"soft_targets: shape {t.shape}, expected {(len(y), self.n_classes_)}"
                " (one row per training row, one column per class)"
            )
        if (
            not np.isfinite(t).all()
            or (t < 0).any()
            or not np.allclose(t.sum(axis=1), 1.0, atol=1e-3)
        ):
            raise BenchError("soft_targets: every row must hold probabilities summing to 1")
        return t

    def fit(
        self,
        X,
        y,
        X_val=None,
        y_val=None,
        classes=None,
        workdir=None,
        epoch_callbacks=None,
        soft_targets=None,
    ):
        configure()
        set_seeds(self.seed)
        self._set_classes(y, classes)
        y = np.searchsorted(self.classes_, y)
        if y_val is not None:
            y_val = np.searchsorted(self.classes_, y_val)
        X, y, X_val, y_val = self._split_validation(
            np.asarray(X), self._targets(y, soft_targets), X_val, y_val, labels=y
        )
        self._fit_inputs(X)  # statistics of the training rows only (stain normalisation)
        self.model_ = self._build(X.shape[1], self.n_classes_)
        self.history_ = fit_keras(
            self.model_,
            X,
            y,
            np.asarray(X_val),
            y_val,
            n_classes=self.n_classes_,
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            learning_rate=self.learning_rate,
            class_weight=self.class_weight,
            patience=self.patience,
            schedule=self.schedule,
            workdir=workdir,
            epoch_callbacks=epoch_callbacks,
            seed=self.seed,
            verbose=self.verbose,
            ema=self.ema,
        )
        self.epochs_run_ = len(self.history_.get("loss", []))
        return self

    def predict_proba(self, X) -> np.ndarray:
        return predict_keras(self.model_, np.asarray(X))

    def inference_parts(self):
        """``(key, trunk, head)`` for fused inference (:class:`ensembles.predictor.Predictor`):
        ``trunk`` runs on the images, the ``head`` layers on its output; models whose
        ``key`` is equal share one trunk pass. Here: the whole model, nothing shared."""
        return None, self.model_, []

    def explain(self, X, class_index=None) -> np.ndarray:
        """Grad-CAM heat maps (N, H, W) ``float32`` in [0, 1] at the resolution of ``X``.

        ``class_index``: ``None`` (each image's predicted class), a column index of
        :meth:`predict_proba`, or one index per image. See :func:`cnn.gradcam.gradcam`.
        """
        return gradcam(self.model_, np.asarray(X), class_index=class_index)

    def adapt(self, X) -> int:
        """AdaBN: the model's trainable batch-norm statistics re-estimated on unlabelled
        images ``X`` (:mod:`cnn.adapt`); returns the number of layers adapted."""
        from cnn.adapt import adapt_batchnorm  # lazy: Keras

        return adapt_batchnorm(self.model_, np.asarray(X))

    def _fit_inputs(self, X) -> None:
        """Fit whatever the model's input layers learn from the training images alone."""

    def randomized(self, seed: int = 0) -> "KerasCandidate":
        """The same candidate with its model's weights re-initialised (seeded): the
        reference of the Grad-CAM randomisation sanity check."""
        other = copy.copy(self)
        other.model_ = randomized_clone(self.model_, seed)
        return other

    def model_size(self):
        return int(self.model_.count_params())

    def check_loaded(self, n_classes: int, image_size: int) -> None:
        """Also the network's output width and input size."""
        super().check_loaded(n_classes, image_size)
        try:
            out_shape, in_shape = tuple(self.model_.output_shape), tuple(self.model_.input_shape)
        except (AttributeError, TypeError, ValueError):
            return
        if out_shape and isinstance(out_shape[-1], int) and out_shape[-1] != n_classes:
            raise BenchError(
                f"the model outputs {out_shape[-1]} class probabilities, "
                f"the manifest lists {n_classes} classes"
            )
        if (
            len(in_shape) == 4
            and all(isinstance(s, int) for s in in_shape[1:3])
            and tuple(in_shape[1:3]) != (image_size, image_size)
        ):
            raise BenchError(
                f"the model takes {in_shape[1]}x{in_shape[2]} images, "
                f"the manifest's image size is {image_size}"
            )

    def _save_model(self, path: Path) -> None:
        self.model_.save(path / MODEL_FILE)

    def _load_model(self, path: Path) -> None:
        import keras

        import cnn.augment  # noqa: F401  (registers the custom layers a model may hold)
        import cnn.backbones  # noqa: F401
        import cnn.models  # noqa: F401  (CellCrop)
        import cnn.stain  # noqa: F401

        configure()
        self.model_ = keras.models.load_model(path / MODEL_FILE, safe_mode=True, compile=False)


@register("scratch_cnn")
class ScratchCNN(KerasCandidate):
    """A CNN trained from scratch: conv blocks, global pooling, dense head, softmax.

    Parameters
    ----------
    blocks, filters, filter_growth, kernel_size, convs_per_block, block_dropout, pooling,
    dense_units, dropout, input_size : architecture (see :func:`cnn.models.build_scratch_cnn`).
    norm : normalisation in the conv blocks: ``"batch"`` (default), ``"group"`` (group
        norm, up to 8 groups) or ``"layer"`` (layer norm over the channels); the last two
        normalise each image by its own statistics (see :func:`cnn.models.norm_layer`).
    augment : augmentation spec, a preset name or a table (see :mod:`cnn.augment`; the
        preset ``"stain"`` adds stain and colour jitter, grayscale and blur); in the
        model, active in training only.
    stain_norm : ``"none"`` or ``"reinhard"``: every image's L*a*b* statistics mapped to
        a target fitted on the unit's training images (:mod:`cnn.stain`), a layer of the
        model after the augmentation, in training and prediction alike.
    crop : fraction of the image side kept around the centre (1: the whole image), a
        layer of the model after the augmentation, in training and prediction alike; the
        crop is resized to ``input_size`` (or back to the image size). Analysers centre
        the cell, and the frame around it is mostly the lab's red cells and background
        (:func:`cnn.models.center_crop`).
    optimizer : ``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum 0.9).
    cell_crop : 0 (off), or a cell-centred crop in place of ``crop``: a window centred on
        the nucleus, ``cell_crop`` times its equivalent diameter, resized back
        (:class:`cnn.models.CellCrop`): the same framing whatever the lab's crop.
    ema : weight averaging: 0 (off) or the momentum of an exponential moving average of
        the weights (e.g. 0.99), which replaces them at the end of training.
    learning_rate, batch_size, epochs, patience, schedule : training.
    class_weight : ``"balanced"`` or ``None``.
    val_fraction : share of the training rows held out for early stopping when no
        validation split is given.
    seed : seed for Python, NumPy, TensorFlow.
    """

    tunable = True
    fit_accepts = KerasCandidate.fit_accepts | {"soft_targets"}
    param_rules = {
        "blocks": {"ge": 1, "le": 8},
        "filters": {"ge": 1},
        "filter_growth": {"gt": 0},
        "kernel_size": {"ge": 1},
        "convs_per_block": {"ge": 1},
        "block_dropout": {"ge": 0, "lt": 1},
        "pooling": {"choices": ["avg", "flatten"]},
        "norm": {"choices": ["batch", "group", "layer"]},
        "stain_norm": {"choices": ["none", "reinhard"]},
        "ema": {"ge": 0, "lt": 1},
        "cell_crop": {"ge": 0},
        **TRAIN_RULES,
    }

    def __init__(
        self,
        blocks=3,
        filters=32,
        filter_growth=2.0,
        kernel_size=3,
        convs_per_block=1,
        block_dropout=0.1,
        pooling="avg",
        dense_units=128,
        dropout=0.3,
        input_size=None,
        augment="flips",
        optimizer="adam",
        learning_rate=1e-3,
        batch_size=64,
        epochs=30,
        patience=5,
        schedule="plateau",
        class_weight="balanced",
        val_fraction=0.1,
        seed=0,
        verbose=0,
        norm="batch",
        stain_norm="none",
        crop=1.0,
        ema=0.0,
        cell_crop=0.0,
    ):
        self.ema = ema
        self.cell_crop = cell_crop
        self.blocks = blocks
        self.filters = filters
        self.filter_growth = filter_growth
        self.kernel_size = kernel_size
        self.convs_per_block = convs_per_block
        self.block_dropout = block_dropout
        self.pooling = pooling
        self.dense_units = dense_units
        self.dropout = dropout
        self.input_size = input_size
        self.augment = augment
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs
        self.patience = patience
        self.schedule = schedule
        self.class_weight = class_weight
        self.val_fraction = val_fraction
        self.seed = seed
        self.verbose = verbose
        self.norm = norm
        self.stain_norm = stain_norm
        self.crop = crop

    def _build(self, image_size, n_classes):
        from cnn.models import build_scratch_cnn

        return build_scratch_cnn(
            image_size,
            n_classes,
            blocks=self.blocks,
            filters=self.filters,
            filter_growth=self.filter_growth,
            kernel_size=self.kernel_size,
            convs_per_block=self.convs_per_block,
            block_dropout=self.block_dropout,
            pooling=self.pooling,
            dense_units=self.dense_units,
            dropout=self.dropout,
            input_size=self.input_size,
            augmentation=self._input_layers(),
            norm=self.norm,
            crop=self.crop,
            cell_crop=self.cell_crop,
        )

    def _input_layers(self):
        """Augmentation (training only), then Reinhard stain normalisation (always) with
        the target fitted on this unit's training images (:mod:`cnn.stain`)."""
        from cnn.augment import build_augmentation

        aug = build_augmentation(self.augment, self.seed)
        if self.stain_norm == "none":
            return aug
        import keras

        from cnn.stain import ReinhardNormalization

        t = self.stain_target_
        norm = ReinhardNormalization(t["mean"], t["std"], name="stain_norm")
        return keras.Sequential([aug, norm] if aug is not None else [norm], name="input_layers")

    def _fit_inputs(self, X) -> None:
        if self.stain_norm == "reinhard":
            from cnn.stain import lab_stats

            self.stain_target_ = lab_stats(X, seed=self.seed)

    @classmethod
    def param_space(cls, trial) -> dict:
        return {
            "blocks": trial.suggest_int("blocks", 2, 4),
            "filters": trial.suggest_categorical("filters", [16, 32, 48]),
            "convs_per_block": trial.suggest_int("convs_per_block", 1, 2),
            "dense_units": trial.suggest_categorical("dense_units", [64, 128, 256]),
            "dropout": trial.suggest_float("dropout", 0.1, 0.5),
            "augment": trial.suggest_categorical("augment", ["flips", "default"]),
            "input_size": trial.suggest_categorical("input_size", [48, 64]),
            "learning_rate": trial.suggest_float("learning_rate", 3e-4, 3e-3, log=True),
            "optimizer": trial.suggest_categorical("optimizer", ["adam", "sgd"]),
            "batch_size": trial.suggest_categorical("batch_size", [32, 64, 128]),
        }
