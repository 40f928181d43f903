"""Transfer learning from ImageNet backbones: frozen (cached embeddings) and fine-tuned.

Every transfer model is one chain of layers that takes the dataset's ``uint8`` images::

    image -> [augment] -> [centre crop] -> [resize to input_size] -> preprocess (the backbone's own
    preprocess_input) -> backbone (a nested keras.Model)
    -> gap -> head_drop -> [fc -> fc_drop] -> logits -> probs (softmax)

Batch norm layers of the backbone stay frozen, and so run in inference mode with their
ImageNet statistics (Keras: a BN layer with ``trainable=False`` always does), unless
``train_bn=True``: then the BN layers of the unfrozen blocks learn their scales and
offsets and use batch statistics in training, adapting to the stain colours of the data.

* :class:`FrozenTransferCNN` (``type = "transfer_frozen"``) computes each image's
  embedding once (``prepare``, cached on disk by :mod:`cnn.embeddings`) and trains only
  the head on them, which is fast on a CPU. Augmentation cannot apply here: an
  embedding is computed once per image, not per epoch. The saved model is the full
  chain above (backbone + trained head), so it takes raw images like every other CNN.
* :class:`FineTuneTransferCNN` (``type = "transfer_finetune"``) trains the head on the
  frozen backbone for ``head_epochs``, then unfreezes the top ``unfreeze_blocks`` blocks
  of the backbone and goes on at ``learning_rate * finetune_lr_factor``, with
  augmentation in the model.

``weights_missing`` (both): what a missing local weights file does. ``"error"`` (default)
stops with one line naming the file, before any training (``prepare``, which ``run``
calls once before the work units, resolves the weights); ``"random"`` (the ``smoke``
profile, so that a clone without ``../shared`` runs) initialises the backbone randomly
after one warning line naming the file. Which weights the backbone got is recorded in
``backbone_weights_`` and saved beside the model (``backbone.json``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from core.images import crops
from core.registry import register
from cnn.candidate import TRAIN_RULES, KerasCandidate
from cnn.runtime import configure, set_seeds
from cnn.embeddings import cached_embeddings
from cnn.train import fit_keras, predict_keras
from cnn.weights import (
    WEIGHTS_MISSING,
    effective_input_size,
    is_file_spec,
    local_weights,
    missing_weights_file,
    resolve_weights,
)
from core.io import file_sha256

HEAD_LAYERS = ("head_drop", "fc", "fc_drop", "logits")
BACKBONE_FILE = "backbone.json"  # which weights the backbone started from (saved model)


def head_layers(n_classes: int, dense_units: int, dropout: float) -> list:
    """The classifier head after global pooling; pre-softmax scores are layer ``logits``."""
    from keras import layers

    out = [layers.Dropout(dropout, name="head_drop")] if dropout else []
    if dense_units:
        out.append(layers.Dense(dense_units, activation="relu", name="fc"))
        if dropout:
            out.append(layers.Dropout(dropout, name="fc_drop"))
    out.append(layers.Dense(n_classes, name="logits"))
    out.append(layers.Activation("softmax", name="probs", dtype="float32"))
    return out


def _features(inputs, image_size, size, backbone_name, base, crop=None):
    from keras import layers

    from cnn.backbones import BackbonePreprocess
    from cnn.models import center_crop

    x = center_crop(inputs, image_size, crop)
    if size != x.shape[1]:
        x = layers.Resizing(size, size, name="resize")(x)
    x = BackbonePreprocess(backbone_name, name="preprocess")(x)
    x = base(x)  # frozen BN layers run in inference mode (Keras semantics of trainable=False)
    return layers.GlobalAveragePooling2D(name="gap")(x)


def build_transfer_model(
    image_size: int,
    n_classes: int,
    base,
    backbone: str = "MobileNetV2",
    input_size=None,
    dense_units: int = 128,
    dropout: float = 0.3,
    augmentation=None,
    crop=None,
    name: str = "transfer_cnn",
):
    """The full transfer model on ``uint8`` input of side ``image_size`` (see module doc).

    ``base`` is the backbone from :func:`cnn.backbones.build_backbone` built for
    ``effective_input_size(image_size, input_size, backbone)``. ``crop``: the central
    fraction of each image side kept before the resize (:func:`cnn.models.center_crop`).
    """
    import keras

    size = effective_input_size(image_size, input_size, backbone)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = augmentation(inputs) if augmentation is not None else inputs
    x = _features(x, image_size, size, backbone, base, crop)
    for layer in head_layers(n_classes, dense_units, dropout):
        x = layer(x)
    return keras.Model(inputs, x, name=name)


def build_embedder(image_size: int, base, backbone: str, input_size=None, crop=None):
    """``uint8`` images -> globally pooled backbone features (inference only)."""
    import keras

    size = effective_input_size(image_size, input_size, backbone)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    return keras.Model(
        inputs, _features(inputs, image_size, size, backbone, base, crop), name="embedder"
    )


def build_head(dim: int, n_classes: int, dense_units: int, dropout: float):
    """The head alone, on ``dim``-long embeddings (frozen mode)."""
    import keras

    inputs = keras.Input((dim,), name="embedding")
    x = inputs
    for layer in head_layers(n_classes, dense_units, dropout):
        x = layer(x)
    return keras.Model(inputs, x, name="head")


_BLOCK_PATTERNS = [
    re.compile(p)
    for p in (
        r"^(conv\d+_block\d+)_",  # ResNet, DenseNet
        r"^(block_?\d+[a-z]?)_",  # MobileNetV2 (block_13_), EfficientNet (block6a_), VGG, Xception
        r"^conv_(?:dw|pw)_(\d+)",  # MobileNet v1
        r"^(mixed\d+)",  # Inception
        r"^(stage\d+)",  # ConvNeXt-like
    )
]


def block_key(layer_name: str) -> str | None:
    """The architecture's own block name a layer belongs to, or ``None``."""
    for pat in _BLOCK_PATTERNS:
        m = pat.match(layer_name)
        if m:
            return m.group(1)
    return None


def backbone_blocks(base) -> list[tuple[str | None, object]]:
    """(block, layer) for every backbone layer; unnamed layers join the preceding block
    (so the last conv after the final block belongs to the top block)."""
    out, current = [], None
    for layer in base.layers:
        current = block_key(layer.name) or current
        out.append((current, layer))
    return out


def set_trainable_top_blocks(base, n_blocks: int, train_bn: bool = False) -> list[str]:
    """Freeze ``base`` except its top ``n_blocks`` blocks; returns their names.

    Batch-norm layers stay frozen unless ``train_bn``.
    """
    from keras import layers

    pairs = backbone_blocks(base)
    order = list(dict.fromkeys(k for k, _ in pairs if k))
    top = set(order[-n_blocks:]) if n_blocks > 0 else set()
    base.trainable = bool(top)
    for key, layer in pairs:
        layer.trainable = key in top and (
            train_bn or not isinstance(layer, layers.BatchNormalization)
        )
    return [k for k in order if k in top]


class TransferCandidate(KerasCandidate):
    """Shared parameters and helpers of the transfer candidates."""

    tunable = True
    param_rules = {
        **TRAIN_RULES,
        "backbone": {"type": str},
        "weights": {"type": str, "none": True},
        "alpha": {"gt": 0},
        "embed_batch_size": {"type": int, "ge": 1, "none": True},
        "head_epochs": {"ge": 0},
        "unfreeze_blocks": {"ge": 0},
        "finetune_lr_factor": {"gt": 0},
        "weights_missing": {"choices": list(WEIGHTS_MISSING)},
    }

    def _input_size(self, image_size: int) -> int:
        return effective_input_size(image_size, self.input_size, self.backbone)

    def _resolved_weights(self):
        """``"imagenet"``, a file or ``None`` (random); a missing file raises or warns
        (``weights_missing``)."""
        return resolve_weights(self.weights, self.backbone, self.alpha, self.weights_missing)

    def _check_weights_file(self) -> None:
        """Raise (or warn once, ``weights_missing = "random"``) for a missing weights file,
        without importing Keras."""
        if is_file_spec(self.weights):
            local_weights(self.weights, self.backbone, self.weights_missing)

    def _base(self, image_size: int):
        from cnn.backbones import build_backbone

        base = build_backbone(
            self.backbone,
            self._input_size(image_size),
            self.weights,
            self.alpha,
            weights_missing=self.weights_missing,
        )
        missing = missing_weights_file(self.weights)
        self.backbone_weights_ = {
            "weights": self.weights,
            "missing_file": missing,
            "initialised": (
                "random"
                if missing or self.weights is None or str(self.weights).lower() in ("none", "")
                else "imagenet"
                if self.weights == "imagenet"
                else "file"
            ),
        }
        return base

    def fit_notes(self) -> list[str]:
        w = getattr(self, "backbone_weights_", None) or {}
        if w.get("missing_file"):
            return [
                f"{self.backbone} started from random weights: its weights file "
                f'{w["missing_file"]} was missing (weights_missing = "random")'
            ]
        return []

    def _save_model(self, path: Path) -> None:
        super()._save_model(path)
        if getattr(self, "backbone_weights_", None) is not None:
            (Path(path) / BACKBONE_FILE).write_text(json.dumps(self.backbone_weights_, indent=1))

    def _load_model(self, path: Path) -> None:
        super()._load_model(path)
        f = Path(path) / BACKBONE_FILE
        if f.is_file():
            self.backbone_weights_ = json.loads(f.read_text())

    def _encode(self, y, y_val, classes):
        self._set_classes(y, classes)
        y = np.searchsorted(self.classes_, y)
        if y_val is not None:
            y_val = np.searchsorted(self.classes_, y_val)
        return y, y_val

    def _train(
        self,
        model,
        X,
        y,
        X_val,
        y_val,
        workdir,
        epoch_callbacks,
        *,
        epochs,
        learning_rate,
        initial_epoch=0,
        patience=None,
    ):
        return fit_keras(
            model,
            X,
            y,
            X_val,
            y_val,
            n_classes=self.n_classes_,
            epochs=epochs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            learning_rate=learning_rate,
            class_weight=self.class_weight,
            patience=patience or self.patience,
            schedule=self.schedule,
            workdir=workdir,
            epoch_callbacks=epoch_callbacks,
            seed=self.seed,
            verbose=self.verbose,
            initial_epoch=initial_epoch,
        )


@register("transfer_frozen")
class FrozenTransferCNN(TransferCandidate):
    """ImageNet backbone kept frozen; a small head trained on cached embeddings.

    Parameters
    ----------
    backbone : str
        A ``keras.applications`` model name or ``"EfficientNetLite0"``.
    weights : str
        ``"imagenet"`` or a local weights file (see :mod:`cnn.backbones`).
    weights_missing : str
        ``"error"`` (default): a missing weights file stops with one line naming it;
        ``"random"``: a randomly initialised backbone and one warning line instead.
    alpha : float
        Width multiplier (MobileNet families only).
    input_size : int, optional
        Side the images are resized to before the backbone (default: the image size,
        raised to the backbone's minimum).
    crop : float
        Fraction of the image side kept around the centre before the resize (1: the
        whole image; :func:`cnn.models.center_crop`), part of the embedder and of the
        saved model.
    dense_units, dropout : head: hidden units (0: none) and dropout.
    optimizer, learning_rate, batch_size, epochs, patience, schedule, class_weight,
    val_fraction, seed, verbose : training of the head, as :class:`cnn.candidate.ScratchCNN`.
    embed_batch_size : int, optional
        Images per backbone forward pass when computing embeddings (default: by input
        size, :func:`cnn.train.auto_batch_size`: 20 at 224 px).
    use_cache : bool
        Keep embeddings in ``$BLOODBENCH_CACHE/embeddings`` (off for random weights).
    """

    needs_prepare = True  # embeddings of all images, once
    prepare_in_child = True  # TensorFlow keeps a backbone pass's memory for its process

    def __init__(
        self,
        backbone="MobileNetV2",
        weights="imagenet",
        alpha=1.0,
        input_size=None,
        dense_units=256,
        dropout=0.3,
        optimizer="adam",
        learning_rate=1e-3,
        batch_size=64,
        epochs=60,
        patience=8,
        schedule="plateau",
        class_weight="balanced",
        val_fraction=0.1,
        embed_batch_size=None,
        use_cache=True,
        seed=0,
        verbose=0,
        weights_missing="error",
        crop=1.0,
    ):
        self.backbone = backbone
        self.crop = crop
        self.weights = weights
        self.weights_missing = weights_missing
        self.alpha = alpha
        self.input_size = input_size
        self.dense_units = dense_units
        self.dropout = dropout
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs
        self.patience = patience
        self.schedule = schedule
        self.class_weight = class_weight
        self.val_fraction = val_fraction
        self.embed_batch_size = embed_batch_size
        self.use_cache = use_cache
        self.seed = seed
        self.verbose = verbose

    # -- embeddings ------------------------------------------------------------------
    def _spec(self, image_size: int) -> dict:
        w = self._resolved_weights()
        import keras

        spec = {
            "backbone": self.backbone,
            "alpha": self.alpha,
            "input_size": self._input_size(image_size),
            "weights": (
                "imagenet-keras-" + keras.__version__
                if w == "imagenet"
                else file_sha256(w)
                if w
                else None
            ),
        }
        if crops(self.crop):  # whole images keep the keys of earlier caches
            spec["crop"] = float(self.crop)
        return spec

    def _ensure_backbone(self, image_size: int) -> None:
        if getattr(self, "embedder_", None) is None or self.image_size_ != image_size:
            configure()
            self.base_ = self._base(image_size)
            self.embedder_ = build_embedder(
                image_size, self.base_, self.backbone, self.input_size, self.crop
            )
            self.image_size_ = image_size

    def embed(self, X, progress: bool = False) -> np.ndarray:
        """Pooled backbone features (N, D) of ``uint8`` images ``X`` (cached on disk)."""
        X = np.asarray(X)
        size = X.shape[1]
        spec = self._spec(size)

        def compute(batch):
            self._ensure_backbone(size)
            return self.embedder_(batch.astype(np.float32), training=False)

        side = self._input_size(size)
        batch = self.embed_batch_size or int(max(8, min(256, 256 * (64 / side) ** 2)))
        return cached_embeddings(
            X,
            spec,
            compute,
            batch_size=batch,
            use_cache=self.use_cache and spec["weights"] is not None,
            progress=progress,
        )

    def prepare(self, X_all) -> None:
        """Compute and cache the embeddings of all images once (no labels involved)."""
        self.embed(X_all, progress=True)

    # -- fit / predict ---------------------------------------------------------------
    def fit(self, X, y, X_val=None, y_val=None, classes=None, workdir=None, epoch_callbacks=None):
        configure()
        set_seeds(self.seed)
        y, y_val = self._encode(y, y_val, classes)
        X = np.asarray(X)
        E = self.embed(X)
        E_val = self.embed(X_val) if X_val is not None else None
        Et, yt, Ev, yv = self._split_validation(E, y, E_val, y_val)
        self.head_ = build_head(E.shape[1], self.n_classes_, self.dense_units, self.dropout)
        self.history_ = self._train(
            self.head_,
            Et,
            yt,
            Ev,
            yv,
            workdir,
            epoch_callbacks,
            epochs=self.epochs,
            learning_rate=self.learning_rate,
        )
        self.epochs_run_ = len(self.history_.get("loss", []))
        self._ensure_backbone(X.shape[1])
        self.model_ = build_transfer_model(
            X.shape[1],
            self.n_classes_,
            self.base_,
            self.backbone,
            self.input_size,
            self.dense_units,
            self.dropout,
            crop=self.crop,
            name="transfer_frozen",
        )
        for name in HEAD_LAYERS:
            if name in {lyr.name for lyr in self.head_.layers}:
                self.model_.get_layer(name).set_weights(self.head_.get_layer(name).get_weights())
        return self

    def inference_parts(self):
        """``trunk`` maps ``uint8`` images to pooled backbone features, ``head`` is the list
        of trained layers after it, and ``key`` digests the trunk's weights. The backbone
        is frozen, so every fold model of a candidate has the same key and one forward pass
        of the trunk serves them all (the key also holds the crop, which has no weights)."""
        import hashlib

        import keras

        names = [lyr.name for lyr in self.model_.layers]
        trunk = keras.Model(self.model_.inputs, self.model_.get_layer("gap").output)
        head = self.model_.layers[names.index("gap") + 1 :]
        h = hashlib.sha256(repr((trunk.inputs[0].shape, float(self.crop))).encode())
        for w in trunk.weights:
            h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
        return h.hexdigest(), trunk, head

    def predict_proba(self, X) -> np.ndarray:
        if getattr(self, "head_", None) is not None:  # fitted here: reuse cached embeddings
            return predict_keras(self.head_, self.embed(X))
        return predict_keras(self.model_, np.asarray(X))

    @classmethod
    def param_space(cls, trial) -> dict:
        return {
            "dense_units": trial.suggest_categorical("dense_units", [0, 128, 256, 512]),
            "dropout": trial.suggest_float("dropout", 0.0, 0.5),
            "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
            "optimizer": trial.suggest_categorical("optimizer", ["adam", "sgd"]),
            "batch_size": trial.suggest_categorical("batch_size", [32, 64, 128]),
        }


@register("transfer_finetune")
class FineTuneTransferCNN(TransferCandidate):
    """ImageNet backbone fine-tuned: head first, then the top blocks at a lower rate.

    Parameters
    ----------
    backbone, weights, weights_missing, alpha, input_size, crop, dense_units, dropout :
        as :class:`FrozenTransferCNN`.
    augment : str or dict
        Augmentation spec (:mod:`cnn.augment`), training only.
    head_epochs : int
        Epochs of the head alone on the frozen backbone (phase 1).
    unfreeze_blocks : int
        Top blocks of the backbone trained in phase 2 (the architecture's own blocks:
        ``block_16`` ... of MobileNetV2, ``block7a`` ... of EfficientNet); 0: no phase 2.
    finetune_lr_factor : float
        Phase-2 learning rate = ``learning_rate * finetune_lr_factor``.
    train_bn : bool
        Also train the unfrozen blocks' batch-norm layers (batch statistics in training,
        moving statistics updated); otherwise they stay in inference mode.
    epochs : int
        Maximum epochs of phase 2 (early stopping on validation loss in both phases).
    optimizer, learning_rate, batch_size, patience, schedule, class_weight,
    val_fraction, seed, verbose : as :class:`cnn.candidate.ScratchCNN`.
    """

    needs_prepare = True  # prepare: the weights file checked once, before the work units
    fit_accepts = TransferCandidate.fit_accepts | {"soft_targets"}

    def __init__(
        self,
        backbone="MobileNetV2",
        weights="imagenet",
        alpha=1.0,
        input_size=None,
        dense_units=128,
        dropout=0.3,
        augment="flips",
        head_epochs=5,
        unfreeze_blocks=3,
        finetune_lr_factor=0.1,
        train_bn=False,
        optimizer="adam",
        learning_rate=1e-3,
        batch_size=64,
        epochs=20,
        patience=5,
        schedule="plateau",
        class_weight="balanced",
        val_fraction=0.1,
        seed=0,
        verbose=0,
        weights_missing="error",
        crop=1.0,
    ):
        self.backbone = backbone
        self.crop = crop
        self.weights = weights
        self.weights_missing = weights_missing
        self.alpha = alpha
        self.input_size = input_size
        self.dense_units = dense_units
        self.dropout = dropout
        self.augment = augment
        self.head_epochs = head_epochs
        self.unfreeze_blocks = unfreeze_blocks
        self.finetune_lr_factor = finetune_lr_factor
        self.train_bn = train_bn
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

    def prepare(self, X_all) -> None:
        """Nothing to compute once: resolve the backbone's weights, so that a missing file
        stops the run (or warns, ``weights_missing = "random"``) before any work unit."""
        self._check_weights_file()

    def _build(self, image_size, n_classes):
        from cnn.augment import build_augmentation

        self.base_ = self._base(image_size)
        return build_transfer_model(
            image_size,
            n_classes,
            self.base_,
            self.backbone,
            self.input_size,
            self.dense_units,
            self.dropout,
            augmentation=build_augmentation(self.augment, self.seed),
            crop=self.crop,
            name="transfer_finetune",
        )

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
        y, y_val = self._encode(y, y_val, classes)
        X, y, X_val, y_val = self._split_validation(
            np.asarray(X), self._targets(y, soft_targets), X_val, y_val, labels=y
        )
        X_val = np.asarray(X_val)
        self.model_ = self._build(X.shape[1], self.n_classes_)
        self.base_.trainable = False
        hist = self._train(
            self.model_,
            X,
            y,
            X_val,
            y_val,
            workdir,
            epoch_callbacks,
            epochs=self.head_epochs,
            learning_rate=self.learning_rate,
            patience=max(self.patience, self.head_epochs),
        )
        done = len(hist.get("loss", []))
        self.unfrozen_blocks_ = []
        if self.unfreeze_blocks and self.epochs:
            self.unfrozen_blocks_ = set_trainable_top_blocks(
                self.base_, self.unfreeze_blocks, self.train_bn
            )
            h2 = self._train(
                self.model_,
                X,
                y,
                X_val,
                y_val,
                workdir,
                epoch_callbacks,
                epochs=done + self.epochs,
                initial_epoch=done,
                learning_rate=self.learning_rate * self.finetune_lr_factor,
            )
            hist = {k: hist.get(k, []) + h2.get(k, []) for k in set(hist) | set(h2)}
        self.history_ = hist
        self.epochs_run_ = len(hist.get("loss", []))
        return self

    @classmethod
    def param_space(cls, trial) -> dict:
        return {
            "dropout": trial.suggest_float("dropout", 0.0, 0.5),
            "learning_rate": trial.suggest_float("learning_rate", 3e-4, 3e-3, log=True),
            "finetune_lr_factor": trial.suggest_float("finetune_lr_factor", 0.03, 0.3, log=True),
            "unfreeze_blocks": trial.suggest_int("unfreeze_blocks", 1, 5),
            "optimizer": trial.suggest_categorical("optimizer", ["adam", "sgd"]),
            "batch_size": trial.suggest_categorical("batch_size", [32, 64]),
            "augment": trial.suggest_categorical("augment", ["flips", "default"]),
        }
