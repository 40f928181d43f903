"""Grad-CAM heat maps for every Keras CNN candidate, nested backbones included.

Grad-CAM (Selvaraju et al., 2017) weights the channels of the last convolutional
feature map by the spatial mean of the gradient of a class score, sums them, keeps the
positive part and upsamples the result to the input resolution.

Two details make it work on all the models of this project:

* the class score is the **pre-softmax** score: the output of the layer named
  ``logits`` (every model built in :mod:`cnn.models` and :mod:`cnn.transfer` has one,
  followed by the ``Activation`` ``probs``). Without such a layer the input of a final
  softmax activation is used, and failing that the model output itself;
* transfer models hold their backbone as a **nested** ``keras.Model``. Asking the outer
  model for a tensor of the inner graph raises "Graph disconnected"; instead the outer
  layers are replayed one by one inside a ``tf.GradientTape`` and the nested backbone
  returns its feature map and its output from one call. The last convolutional feature
  map is found automatically: the output of the last convolution, extended over the
  batch norm and activation layers that follow it at the same resolution (a nested
  backbone whose output is a 4-D map, as ``keras.applications`` models built with
  ``include_top=False``, counts as that map).
"""

from __future__ import annotations

import numpy as np

from cnn.train import auto_batch_size

from core.errors import BenchError

_ELEMENTWISE = (
    "BatchNormalization",
    "GroupNormalization",
    "LayerNormalization",
    "Activation",
    "ReLU",
    "LeakyReLU",
    "ELU",
    "PReLU",
)
_CONV = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose")


def _is_model(layer) -> bool:
    import keras

    return isinstance(layer, keras.Model)


def _has_conv(layer) -> bool:
    if type(layer).__name__ in _CONV:
        return True
    return _is_model(layer) and any(_has_conv(sub) for sub in layer.layers)


def _spatial(shape) -> bool:
    return shape is not None and len(shape) == 4


def _last_feature_layer(layers):
    """Index of the last conv (or conv-holding sub-model) and of the layer whose output is
    the feature map: the conv extended over following same-shape elementwise layers."""
    idx = None
    for i, layer in enumerate(layers):
        if _has_conv(layer):
            idx = i
    if idx is None:
        return None, None
    end = idx
    shape = tuple(layers[idx].output.shape) if not _is_model(layers[idx]) else None
    while (
        shape is not None
        and end + 1 < len(layers)
        and type(layers[end + 1]).__name__ in _ELEMENTWISE
        and tuple(layers[end + 1].output.shape) == shape
    ):
        end += 1
    return idx, end


def find_target_layer(model) -> list[str]:
    """Path of layer names to the last convolutional feature map of ``model``.

    ``["block3_relu1"]`` for a layer of the model itself; ``["backbone"]`` when a nested
    backbone's output is the map; ``["backbone", "out_relu"]`` when the map lies inside it.
    """
    layers = [lyr for lyr in model.layers if type(lyr).__name__ != "InputLayer"]
    idx, end = _last_feature_layer(layers)
    if idx is None:
        raise BenchError(f"Grad-CAM: model '{model.name}' has no convolutional layer")
    layer = layers[idx]
    if _is_model(layer):
        if _spatial(layer.output.shape):
            return [layer.name]
        return [layer.name] + find_target_layer(layer)
    return [layers[end].name]


def _score_layer(model):
    """(name of the layer whose output is the class score, whether it is pre-softmax)."""
    names = [lyr.name for lyr in model.layers]
    if "logits" in names:
        return "logits"
    last = model.layers[-1]
    if (
        type(last).__name__ == "Activation"
        and getattr(last.activation, "__name__", "") == "softmax"
    ):
        return "__input_of_last__"
    return "__output__"


def _chain(model) -> bool:
    """True when every layer of ``model`` takes exactly the previous layer's output.

    A layer may have nodes in other models too (a backbone shared with an embedding
    model); it is enough that one of its nodes takes the previous layer's output.
    """
    prev = None
    for layer in model.layers:
        if type(layer).__name__ == "InputLayer":
            prev = layer
            continue
        if prev is None:
            return False
        outs = {id(t) for t in _outputs_of(prev)}
        if not any(
            len(n.input_tensors) == 1 and id(n.input_tensors[0]) in outs
            for n in getattr(layer, "_inbound_nodes", [])
        ):
            return False
        prev = layer
    return True


def _outputs_of(layer):
    return [t for n in getattr(layer, "_inbound_nodes", []) for t in n.output_tensors]


class _Explainer:
    """Computes (feature map, class scores) for a batch in a way gradients can follow."""

    def __init__(self, model):
        import keras

        self.model = model
        self.path = find_target_layer(model)
        self.score = _score_layer(model)
        self.nested = len(self.path) > 1 or _is_model(model.get_layer(self.path[0]))
        if not self.nested:
            target = model.get_layer(self.path[0]).output
            if self.score == "logits":
                score = model.get_layer("logits").output
            elif self.score == "__input_of_last__":
                score = model.layers[-1].input
            else:
                score = model.outputs[0]
            self.graph = keras.Model(model.inputs, [target, score])
            return
        if not _chain(model):
            raise BenchError(
                f"Grad-CAM: model '{model.name}' nests its backbone in a graph "
                "that is not a chain of layers; give its last conv feature map "
                "a place in the outer model"
            )
        self.layers = [lyr for lyr in model.layers if type(lyr).__name__ != "InputLayer"]
        sub = model.get_layer(self.path[0])
        if len(self.path) == 1:
            self.inner = None
        else:
            inner_target = sub
            for name in self.path[1:]:
                inner_target = inner_target.get_layer(name)
            self.inner = keras.Model(sub.inputs, [inner_target.output, sub.outputs[0]])

    def __call__(self, x):
        """Feature map and class scores of ``x`` (call inside the gradient tape)."""
        if not self.nested:
            feat, score = self.graph(x, training=False)
            return feat, score
        feat = score = None
        for layer in self.layers:
            if layer.name == self.path[0]:
                if self.inner is None:
                    x = layer(x, training=False)
                    feat = x
                else:
                    feat, x = self.inner(x, training=False)
            else:
                if self.score == "__input_of_last__" and layer is self.layers[-1]:
                    score = x
                x = layer(x, training=False)
            if layer.name == "logits":
                score = x
        if score is None:
            score = x
        return feat, score


def gradcam(model, images, class_index=None, batch_size: int | None = None) -> np.ndarray:
    """Grad-CAM heat maps of ``images`` for ``model``.

    Parameters
    ----------
    model : keras.Model
        A CNN classifier (scratch or transfer, with a nested backbone or not).
    images : array (N, H, W, 3)
        ``uint8`` (or float) images as the model takes them.
    class_index : None, int or array of N ints
        Class whose score is explained: ``None`` the predicted class of each image.
    batch_size : int, optional
        Images per gradient computation (default: by the model's working resolution,
        a quarter of :func:`cnn.train.auto_batch_size`).

    Returns
    -------
    np.ndarray
        (N, H, W) ``float32`` in [0, 1] at the resolution of ``images``; each map is
        scaled by its maximum (all zeros when no location supports the class).
    """
    import tensorflow as tf

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise BenchError(f"Grad-CAM needs images (N, H, W, 3); got shape {images.shape}")
    n, h, w = images.shape[:3]
    if class_index is not None:
        idx = np.broadcast_to(np.asarray(class_index, dtype=np.int64), (n,))
    explainer = _Explainer(model)
    window = _crop_window(model, h, w)
    if not batch_size:
        batch_size = auto_batch_size(model, at_64px=64, minimum=4)
    maps = []
    for start in range(0, n, batch_size):
        x = tf.convert_to_tensor(images[start : start + batch_size].astype(np.float32))
        with tf.GradientTape() as tape:
            tape.watch(x)  # records every op, even in frozen (non-trainable) backbones
            feat, score = explainer(x)
            cls = (
                tf.argmax(score, axis=-1)
                if class_index is None
                else tf.constant(idx[start : start + batch_size])
            )
            picked = tf.gather(score, cls, axis=1, batch_dims=1)
        grads = tape.gradient(picked, feat)
        if grads is None:
            raise BenchError(
                f"Grad-CAM: no gradient from the class score to the feature map "
                f"{'/'.join(explainer.path)} of model '{model.name}'"
            )
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * feat, axis=-1))[..., None]
        if window is None:
            cam = tf.image.resize(cam, (h, w), method="bilinear")[..., 0]
        else:  # the model saw only its centre crop: the map covers that window, 0 around
            top, left, ch, cw = window
            cam = tf.image.resize(cam, (ch, cw), method="bilinear")
            cam = tf.image.pad_to_bounding_box(cam, top, left, h, w)[..., 0]
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        cam = tf.math.divide_no_nan(cam, peak)
        maps.append(np.clip(cam.numpy(), 0.0, 1.0).astype(np.float32))
    return np.concatenate(maps) if maps else np.zeros((0, h, w), np.float32)


def _crop_window(model, h: int, w: int):
    """``(top, left, height, width)`` of the model's ``center_crop`` layer on (h, w)
    images (:func:`cnn.models.center_crop`), or ``None`` when it has none."""
    try:
        layer = model.get_layer("center_crop")
    except ValueError:
        return None
    ch, cw = min(int(layer.height), h), min(int(layer.width), w)
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def randomized_clone(model, seed: int = 0):
    """The same architecture with freshly initialised weights (seeded)."""
    import keras

    keras.utils.set_random_seed(int(seed))
    return keras.models.clone_model(model)  # new layers, weights from their initializers
