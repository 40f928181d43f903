"""Grad-CAM: the contract, nested backbones, and that it points at what decides the class."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import SHARED, toy_arrays

WEIGHTS = SHARED / "weights" / "mobilenet_v2_0.35_imagenet_notop.weights.h5"
needs_weights = pytest.mark.skipif(
    not WEIGHTS.is_file(), reason=f"shared ImageNet weights not found: {WEIGHTS}"
)


def square_task(n_per_class: int, size: int = 32, side: int = 8, seed: int = 0):
    """Class 1: a bright square at a random place on noise; class 0: noise only.

    Returns images, labels and the square's mask (where class 1 would have it).
    """
    rng = np.random.default_rng(seed)
    n = 2 * n_per_class
    X = rng.normal(110, 25, (n, size, size, 3)).clip(0, 255)
    y = np.repeat([0, 1], n_per_class)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        r, c = rng.integers(0, size - side, 2)
        masks[i, r : r + side, c : c + side] = True
        if y[i] == 1:
            X[i, r : r + side, c : c + side] = 240
    return X.astype(np.uint8), y, masks


def inside_outside(maps, masks):
    inside = np.array([m[k].mean() for m, k in zip(maps, masks)])
    outside = np.array([m[~k].mean() for m, k in zip(maps, masks)])
    return inside, outside


def check_contract(maps, n, size):
    assert maps.shape == (n, size, size) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0


def test_gradcam_contract_on_a_scratch_model():
    from cnn.gradcam import find_target_layer, gradcam
    from cnn.models import build_scratch_cnn

    model = build_scratch_cnn(32, 3, blocks=2, filters=4, convs_per_block=2)
    assert find_target_layer(model) == ["block2_relu2"]  # last conv map, before pooling
    X, _ = toy_arrays(3, 32)
    for ci in (None, 2, np.arange(len(X)) % 3):
        check_contract(gradcam(model, X, class_index=ci, batch_size=4), len(X), 32)
    assert gradcam(model, X[:0]).shape == (0, 32, 32)


def test_gradcam_highlights_the_deciding_square():
    from cnn.candidate import ScratchCNN

    X, y, _ = square_task(40)
    Xt, yt, Mt = square_task(8, seed=1)
    cand = ScratchCNN(
        blocks=2,
        filters=8,
        dense_units=16,
        dropout=0.1,
        epochs=10,
        patience=10,
        batch_size=16,
        learning_rate=0.005,
        augment="none",
        seed=0,
    ).fit(X, y)
    assert (cand.predict(Xt) == yt).mean() >= 0.9
    pos = yt == 1
    maps = cand.explain(Xt[pos], class_index=1)
    check_contract(maps, pos.sum(), 32)
    inside, outside = inside_outside(maps, Mt[pos])
    assert (inside > 2 * outside).mean() >= 0.8, (inside, outside)
    peaks = [np.unravel_index(m.argmax(), m.shape) for m in maps]
    near = [np.abs(np.argwhere(k) - p).max(axis=1).min() <= 4 for k, p in zip(Mt[pos], peaks)]
    assert np.mean(near) >= 0.8


def _nested_model(pooling=None):
    """A transfer-style chain whose backbone is a nested keras.Model."""
    import keras
    from keras import layers
    from cnn.backbones import BackbonePreprocess, build_backbone

    base = build_backbone("MobileNetV2", 64, str(WEIGHTS), alpha=0.35)
    if pooling:  # map inside the nested model: its output is already pooled
        base = keras.Model(
            base.inputs, layers.GlobalAveragePooling2D()(base.output), name="backbone_pooled"
        )
    inputs = keras.Input((32, 32, 3))
    x = layers.Resizing(64, 64, name="resize")(inputs)
    x = BackbonePreprocess("MobileNetV2", name="preprocess")(x)
    x = base(x, training=False)
    if not pooling:
        x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(2, name="logits")(x)
    return keras.Model(inputs, layers.Activation("softmax", name="probs")(x)), base


@needs_weights
@pytest.mark.parametrize("pooling", [None, "avg"])
def test_gradcam_on_nested_backbone_matches_a_manual_computation(pooling):
    import tensorflow as tf

    from cnn.gradcam import find_target_layer, gradcam

    model, base = _nested_model(pooling)
    path = find_target_layer(model)
    assert path == (["backbone"] if pooling is None else ["backbone_pooled", "out_relu"])
    X, _ = toy_arrays(2, 32, seed=3)
    maps = gradcam(model, X, class_index=1)
    check_contract(maps, len(X), 32)
    # reference: the same Grad-CAM written out by hand on the pieces
    import keras

    feat_model = keras.Model(base.inputs, base.get_layer("out_relu").output)
    x = tf.convert_to_tensor(X.astype("float32"))
    with tf.GradientTape() as tape:
        z = model.get_layer("preprocess")(model.get_layer("resize")(x))
        feat = feat_model(z, training=False)
        tape.watch(feat)
        score = model.get_layer("logits")(keras.ops.mean(feat, axis=(1, 2)))[:, 1]
    grads = tape.gradient(score, feat)
    cam = tf.nn.relu(tf.reduce_sum(tf.reduce_mean(grads, axis=(1, 2), keepdims=True) * feat, -1))
    cam = tf.image.resize(cam[..., None], (32, 32))[..., 0].numpy()
    cam = cam / np.maximum(cam.max(axis=(1, 2), keepdims=True), 1e-12)
    np.testing.assert_allclose(maps, cam, atol=1e-4)


@needs_weights
def test_gradcam_on_a_frozen_transfer_candidate_points_at_the_square():
    from cnn.transfer import FrozenTransferCNN

    X, y, _ = square_task(30)
    Xt, yt, Mt = square_task(6, seed=2)
    cand = FrozenTransferCNN(
        weights=str(WEIGHTS),
        alpha=0.35,
        input_size=96,
        dense_units=0,
        dropout=0.0,
        epochs=30,
        patience=10,
        batch_size=16,
        learning_rate=0.01,
        seed=0,
    ).fit(X, y)
    assert (cand.predict(Xt) == yt).mean() >= 0.8
    pos = yt == 1
    maps = cand.explain(Xt[pos])
    check_contract(maps, pos.sum(), 32)
    inside, outside = inside_outside(maps, Mt[pos])
    assert (inside > outside).mean() >= 0.8, (inside, outside)
