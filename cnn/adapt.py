"""Unsupervised test-time adaptation: batch-norm statistics re-estimated on new images (AdaBN).

Li et al. (2016), "Revisiting batch normalization for practical domain adaptation": a
network's batch-norm layers keep the mean and variance of their inputs on the *training*
images; on another lab's images those statistics are off (stain, camera). AdaBN replaces
them, layer by layer in the order of the network, with the statistics of the new images'
inputs to each layer (no labels; the trained weights are kept). Results are transductive
(they use the test images themselves) and are reported apart from the plain ones.

Only batch-norm layers that learned their statistics on the training data are adapted
(``trainable``); frozen layers of an ImageNet backbone, nested models and other
normalisations are left as they are.
"""

from __future__ import annotations

import keras
import numpy as np


def batchnorm_layers(model) -> list:
    """The model's own trainable batch-norm layers, in the order of the network."""
    return [
        lyr
        for lyr in model.layers
        if isinstance(lyr, keras.layers.BatchNormalization) and lyr.trainable
    ]


def adapt_batchnorm(model, X: np.ndarray, batch_size: int = 256) -> int:
    """Re-estimate each trainable batch-norm layer's moving mean and variance on ``X``
    (inputs to the layer computed with the layers before it already adapted). Returns
    the number of layers adapted."""
    layers = batchnorm_layers(model)
    for bn in layers:
        probe = keras.Model(model.inputs, bn.input)
        axes = tuple(i for i in range(len(bn.input.shape)) if i != bn.axis % len(bn.input.shape))
        total, total_sq, n = 0.0, 0.0, 0
        for i in range(0, len(X), batch_size):
            # the inputs as the model's structure (a list of its one input): a bare tensor
            # draws Keras's "structure of inputs doesn't match" warning once per batch
            h = keras.ops.convert_to_numpy(probe([X[i : i + batch_size]], training=False))
            h = h.astype(np.float64)
            total = total + h.sum(axis=axes)
            total_sq = total_sq + (h * h).sum(axis=axes)
            n += int(np.prod([h.shape[a] for a in axes]))
        mean = total / n
        var = np.maximum(total_sq / n - mean * mean, 0.0)
        bn.moving_mean.assign(mean.astype("float32"))
        bn.moving_variance.assign(var.astype("float32"))
    return len(layers)
