"""Training loop for Keras candidates: tf.data pipeline, callbacks, class weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnn.runtime import configure


def make_dataset(X, y=None, batch_size: int = 64, shuffle: bool = False, seed: int = 0):
    """A ``tf.data`` pipeline from in-memory ``uint8`` images: cache, shuffle, batch, prefetch."""
    import tensorflow as tf

    X = np.asarray(X)
    ds = tf.data.Dataset.from_tensor_slices(X if y is None else (X, np.asarray(y)))
    ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(X), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def balanced_class_weight(y: np.ndarray, n_classes: int) -> dict[int, float]:
    counts = np.bincount(y, minlength=n_classes).astype(float)
    counts[counts == 0] = 1.0
    w = len(y) / (n_classes * counts)
    return {i: float(v) for i, v in enumerate(w)}


def make_optimizer(name: str, learning_rate: float, ema: float = 0.0):
    """The optimizer ``name``; ``ema`` > 0 keeps an exponential moving average of the
    weights with that momentum (Keras' ``use_ema``), which replaces the weights at the end
    of training (weight averaging)."""
    import keras

    avg = {"use_ema": True, "ema_momentum": float(ema)} if ema else {}
    if name == "adam":
        return keras.optimizers.Adam(learning_rate, **avg)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=1e-4, **avg)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, **avg)
    raise ValueError(f"optimizer must be 'adam', 'adamw' or 'sgd', got {name!r}")


def _epoch_hook(fns):
    import keras

    class EpochHook(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            for fn in fns:
                fn(epoch, dict(logs or {}))

    return EpochHook()


def fit_keras(
    model,
    X,
    y,
    X_val,
    y_val,
    *,
    n_classes: int,
    epochs: int,
    batch_size: int,
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
    class_weight=None,
    patience: int = 5,
    schedule: str = "plateau",
    workdir=None,
    epoch_callbacks=None,
    seed: int = 0,
    verbose: int = 0,
    initial_epoch: int = 0,
    ema: float = 0.0,
) -> dict:
    """Compile and train ``model``; returns the Keras history as a dict of lists.

    ``y`` and ``y_val``: integer labels, or ``(n, n_classes)`` class probabilities (soft
    targets, learnt with categorical cross-entropy). Early stopping watches validation
    loss and restores the best weights; the learning
    rate follows ``schedule`` (``"plateau"``: reduce on plateau, ``"cosine"``: cosine
    decay). With ``workdir``, the best checkpoint and a CSV log of every epoch are kept.
    ``epoch_callbacks`` are called as ``fn(epoch, logs)`` after every epoch; an exception
    they raise (e.g. ``optuna.TrialPruned``) stops training and propagates unchanged.
    ``initial_epoch`` continues a previous phase: epochs are numbered from it, the CSV
    log is appended to, and ``epochs`` is the number of the last epoch (Keras' meaning).
    """
    import keras

    configure()
    steps = int(np.ceil(len(X) / batch_size)) * max(1, epochs - initial_epoch)
    lr = (
        keras.optimizers.schedules.CosineDecay(learning_rate, max(1, steps))
        if schedule == "cosine"
        else learning_rate
    )
    soft = np.ndim(y) == 2  # class probabilities (distillation) rather than labels
    model.compile(
        optimizer=make_optimizer(optimizer, lr, ema),
        loss="categorical_crossentropy" if soft else "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )  # Keras picks the accuracy that fits the targets
    cbs = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss",
            patience=patience,
            restore_best_weights=True,
            start_from_epoch=initial_epoch + min(3, (epochs - initial_epoch) // 4),
        )
    ]
    if ema:  # validation, early stopping and checkpoints see the averaged weights
        cbs.insert(0, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    if schedule == "plateau":
        cbs.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss",
                factor=0.3,
                patience=max(1, patience // 2),
                min_lr=learning_rate / 100,
            )
        )
    elif schedule != "cosine":
        raise ValueError(f"schedule must be 'plateau' or 'cosine', got {schedule!r}")
    if workdir:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        cbs.append(keras.callbacks.CSVLogger(str(workdir / "epochs.csv"), append=initial_epoch > 0))
        cbs.append(
            keras.callbacks.ModelCheckpoint(
                str(workdir / "checkpoint.keras"), monitor="val_loss", save_best_only=True
            )
        )
    if epoch_callbacks:
        cbs.append(_epoch_hook(epoch_callbacks))
    if class_weight == "balanced":  # soft targets: by each row's most likely class
        class_weight = balanced_class_weight(
            np.argmax(y, axis=1) if soft else np.asarray(y), n_classes
        )
    hist = model.fit(
        make_dataset(X, y, batch_size, shuffle=True, seed=seed),
        validation_data=make_dataset(X_val, y_val, batch_size),
        epochs=epochs,
        class_weight=class_weight,
        callbacks=cbs,
        verbose=verbose,
        shuffle=False,
        initial_epoch=initial_epoch,
    )  # the tf.data pipeline shuffles
    return {k: [float(v) for v in vals] for k, vals in hist.history.items()}


def working_size(model) -> int:
    """Largest image side inside ``model``: its input, or a ``Resizing`` layer's target."""
    sizes = [int(model.input_shape[1] or 0)]
    for layer in model.layers:
        if type(layer).__name__ == "Resizing":
            sizes.append(int(layer.height))
    return max(sizes) or 64


def auto_batch_size(model, at_64px: int = 256, minimum: int = 8) -> int:
    """A batch size that keeps activation memory about that of ``at_64px`` images of 64 px
    (MobileNetV2 upsized to 224 px: 20 images, instead of tens of GiB at 256)."""
    side = working_size(model)
    return int(max(minimum, min(at_64px, at_64px * (64 / side) ** 2)))


def predict_keras(model, X, batch_size: int | None = None) -> np.ndarray:
    """Inference-mode probabilities for ``uint8`` images, in batches (default: by size,
    :func:`auto_batch_size`)."""
    batch_size = batch_size or auto_batch_size(model)
    out = [np.asarray(model(batch, training=False)) for batch in make_dataset(X, None, batch_size)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, model.output_shape[-1]))
