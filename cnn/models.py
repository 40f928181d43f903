"""Keras model builders."""

from __future__ import annotations

import keras
from keras import layers

from core.images import crop_side, crops

#: normalisations of the conv blocks, and the tag in their layers' names
NORM_TAGS = {"batch": "bn", "group": "gn", "layer": "ln"}
NORMS = tuple(NORM_TAGS)


def group_count(channels: int, max_groups: int = 8) -> int:
    """Groups of a group norm over ``channels``: the largest divisor of ``channels`` that
    is at most ``min(max_groups, channels)``."""
    top = max(1, min(max_groups, int(channels)))
    return next(g for g in range(top, 0, -1) if channels % g == 0)


def norm_layer(norm: str, channels: int, name: str, bn_momentum: float = 0.9):
    """The normalisation layer of a conv block; ``name`` ends with the tag ``bn``, ``gn``
    or ``ln`` and a number (``block1_bn1``).

    ``"batch"``: batch statistics in training, moving averages at inference. ``"group"``:
    :func:`group_count` groups of channels. ``"layer"``: over the channels of each pixel.
    Group and layer norm use each image's own statistics, in training and at inference
    alike (nothing depends on the batch or on the training set's colour statistics).
    """
    if norm == "batch":
        return layers.BatchNormalization(momentum=bn_momentum, name=name)
    if norm == "group":
        return layers.GroupNormalization(groups=group_count(channels), name=name)
    if norm == "layer":
        return layers.LayerNormalization(axis=-1, name=name)
    raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")


@keras.saving.register_keras_serializable(package="bloodbench")
class CellCrop(layers.Layer):
    """A cell-centred, size-normalised crop of every image, resized back to its side.

    Labs frame their cells differently: CellaVision crops (PBC, DeepAPL) show the cell
    small among red cells, other labs crop tightly so that it fills the frame, and a fixed
    central crop cuts those cells. This layer finds each image's nucleus (the darkest pixels
    of the green channel, where the Romanowsky-stained nucleus absorbs most: below the
    midpoint between the image's minimum and its mean), and keeps a square window centred
    on it whose side is ``scale`` times the nucleus's equivalent diameter (from the spread
    of its pixels), between a quarter of the image side and the whole image, shifted to
    stay inside the image. In training and at prediction alike (a layer of the saved
    model); no weights.
    """

    def __init__(self, scale: float = 1.5, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, x):
        import tensorflow as tf

        x = tf.cast(x, "float32")
        h, w = x.shape[1], x.shape[2]
        g = x[..., 1]
        lo = tf.reduce_min(g, axis=(1, 2), keepdims=True)
        mid = lo + 0.5 * (tf.reduce_mean(g, axis=(1, 2), keepdims=True) - lo)
        mask = tf.cast(g < mid, "float32")
        n = tf.reduce_sum(mask, axis=(1, 2)) + 1e-6
        yy = tf.reshape((tf.range(h, dtype="float32") + 0.5) / h, (1, h, 1))
        xx = tf.reshape((tf.range(w, dtype="float32") + 0.5) / w, (1, 1, w))
        cy = tf.reduce_sum(mask * yy, axis=(1, 2)) / n
        cx = tf.reduce_sum(mask * xx, axis=(1, 2)) / n
        var = (
            tf.reduce_sum(
                mask * ((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2), axis=(1, 2)
            )
            / n
        )
        # a disc of radius R has var = R^2 / 2: equivalent diameter 2 * sqrt(2 var)
        side = tf.clip_by_value(self.scale * 2.0 * tf.sqrt(2.0 * var), 0.25, 1.0)
        half = side / 2
        cy = tf.clip_by_value(cy, half, 1 - half)
        cx = tf.clip_by_value(cx, half, 1 - half)
        boxes = tf.stack([cy - half, cx - half, cy + half, cx + half], axis=1)
        idx = tf.range(tf.shape(x)[0])
        return tf.image.crop_and_resize(x, boxes, idx, (h, w), method="bilinear")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


def center_crop(x, image_size: int, crop: float | None, cell: float = 0.0):
    """The central ``crop`` fraction of each image side (a ``CenterCrop`` layer named
    ``center_crop``), or ``x`` unchanged for ``crop`` of ``None`` or 1.

    Analysers centre the cell they photograph, and the rest of the frame (the red cells
    around it, the background's colour) differs between labs far more than the cell
    does: cropping to the cell keeps what the class is about and drops most of what the
    lab is about (benchmarks/README.md, robustness levers). A layer of the model, so a
    saved model applies it to every image it is given, like the rest of its input
    pipeline (after the augmentation, so that random shifts move the cell inside the
    crop).

    ``cell`` > 0: a :class:`CellCrop` of that scale instead (layer ``cell_crop``).
    """
    if cell:
        return CellCrop(cell, name="cell_crop")(x)
    if not crops(crop):
        return x
    side = crop_side(image_size, crop)
    return layers.CenterCrop(side, side, name="center_crop")(x)


def conv_block(
    x,
    filters: int,
    kernel_size: int,
    convs: int,
    dropout: float,
    name: str,
    bn_momentum: float = 0.9,
    norm: str = "batch",
):
    """``convs`` x (conv, normalisation, ReLU), then max pooling and dropout.

    ``norm`` picks the normalisation (:func:`norm_layer`). Batch norm uses momentum 0.9
    (Keras' 0.99 lags far behind on small data sets, which makes early validation losses
    meaningless and stops training too soon).
    """
    for j in range(convs):
        x = layers.Conv2D(
            filters, kernel_size, padding="same", use_bias=False, name=f"{name}_conv{j + 1}"
        )(x)
        x = norm_layer(norm, filters, f"{name}_{NORM_TAGS.get(norm, 'norm')}{j + 1}", bn_momentum)(
            x
        )
        x = layers.Activation("relu", name=f"{name}_relu{j + 1}")(x)
    x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    if dropout:
        x = layers.Dropout(dropout, name=f"{name}_drop")(x)
    return x


def classifier_head(x, n_classes: int, dense_units: int, dropout: float):
    """Dense layers then softmax; the pre-softmax scores are the layer ``logits``."""
    if dense_units:
        x = layers.Dense(dense_units, activation="relu", name="fc")(x)
        if dropout:
            x = layers.Dropout(dropout, name="fc_drop")(x)
    x = layers.Dense(n_classes, name="logits")(x)
    return layers.Activation("softmax", name="probs", dtype="float32")(x)


def build_scratch_cnn(
    image_size: int,
    n_classes: int,
    blocks: int = 3,
    filters: int = 32,
    filter_growth: float = 2.0,
    kernel_size: int = 3,
    convs_per_block: int = 1,
    block_dropout: float = 0.1,
    pooling: str = "avg",
    dense_units: int = 128,
    dropout: float = 0.3,
    input_size: int | None = None,
    augmentation=None,
    norm: str = "batch",
    crop: float | None = None,
    name: str = "scratch_cnn",
    cell_crop: float = 0.0,
) -> keras.Model:
    """A modular CNN on ``uint8`` RGB input of side ``image_size``.

    The model applies ``augmentation`` (a Keras layer on RGB values in [0, 255], active in
    training only, see :mod:`cnn.augment`), keeps the central ``crop`` fraction of the
    image (:func:`center_crop`; resized back to ``image_size`` when ``input_size`` is not
    given), rescales to [0, 1], optionally resizes to ``input_size``, then ``blocks`` conv
    blocks whose width grows by ``filter_growth``,
    global average pooling (``pooling="avg"``) or flattening, the dense head and softmax.
    ``norm`` is the conv blocks' normalisation: ``"batch"``, ``"group"`` or ``"layer"``
    (:func:`norm_layer`).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = inputs
    if augmentation is not None:
        x = augmentation(x)
    x = center_crop(x, image_size, crop, cell_crop)
    x = layers.Rescaling(1.0 / 255, name="rescale")(x)
    size = input_size or image_size  # a crop is brought back to the image's side
    if x.shape[1] != size:
        x = layers.Resizing(size, size, name="resize")(x)
    for b in range(blocks):
        width = int(round(filters * filter_growth**b))
        x = conv_block(
            x, width, kernel_size, convs_per_block, block_dropout, name=f"block{b + 1}", norm=norm
        )
    if pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="gap")(x)
    elif pooling == "flatten":
        x = layers.Flatten(name="flatten")(x)
    else:
        raise ValueError(f"pooling must be 'avg' or 'flatten', got {pooling!r}")
    outputs = classifier_head(x, n_classes, dense_units, dropout)
    return keras.Model(inputs, outputs, name=name)
