"""Stain normalisation inside the model: Reinhard's colour transfer in CIE L*a*b*.

Each image's L*, a* and b* channels are standardised to zero mean and unit spread (its
own statistics) and mapped to a target mean and spread fitted on the **training images**
of the unit (Reinhard et al. 2001, as used for stain normalisation by Reinhard-style
methods in histology). The layer sits at the model's input, so a saved model normalises
every image it is given, in training and in prediction alike: the predictor needs nothing
else, and the target travels with the model as part of its config.

Blood smears are May-Grünwald-Giemsa or Wright stained, not H&E: Reinhard's method
assumes no stain matrix, which is why it is the one offered here.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

# sRGB (D65) <-> XYZ
_RGB2XYZ = np.array(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ],
    dtype=np.float32,
)
_XYZ2RGB = np.linalg.inv(_RGB2XYZ).astype(np.float32)
_WHITE = np.array([0.950456, 1.0, 1.088754], dtype=np.float32)
_EPS = 0.008856


def _f(t):
    return ops.where(
        t > _EPS, ops.power(ops.maximum(t, 1e-12), 1.0 / 3.0), 7.787 * t + 16.0 / 116.0
    )


def _finv(t):
    t3 = t * t * t
    return ops.where(t3 > _EPS, t3, (t - 16.0 / 116.0) / 7.787)


def rgb_to_lab(x):
    """(..., 3) RGB in [0, 1] -> CIE L*a*b* (L in 0-100)."""
    lin = ops.where(x > 0.04045, ops.power((x + 0.055) / 1.055, 2.4), x / 12.92)
    xyz = ops.matmul(lin, ops.convert_to_tensor(_RGB2XYZ.T)) / _WHITE
    f = _f(xyz)
    L = 116.0 * f[..., 1:2] - 16.0
    a = 500.0 * (f[..., 0:1] - f[..., 1:2])
    b = 200.0 * (f[..., 1:2] - f[..., 2:3])
    return ops.concatenate([L, a, b], axis=-1)


def lab_to_rgb(lab):
    fy = (lab[..., 0:1] + 16.0) / 116.0
    fx = fy + lab[..., 1:2] / 500.0
    fz = fy - lab[..., 2:3] / 200.0
    xyz = ops.concatenate([_finv(fx), _finv(fy), _finv(fz)], axis=-1) * _WHITE
    lin = ops.matmul(xyz, ops.convert_to_tensor(_XYZ2RGB.T))
    lin = ops.clip(lin, 0.0, 1.0)
    return ops.where(
        lin > 0.0031308, 1.055 * ops.power(ops.maximum(lin, 1e-12), 1 / 2.4) - 0.055, 12.92 * lin
    )


def lab_stats(images: np.ndarray, max_images: int = 2000, seed: int = 0) -> dict:
    """The target: mean over images of each image's L*a*b* channel means and spreads."""
    rows = np.arange(len(images))
    if len(rows) > max_images:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_images, replace=False))
    means, stds = [], []
    for i in range(0, len(rows), 256):
        lab = ops.convert_to_numpy(
            rgb_to_lab(np.asarray(images[rows[i : i + 256]], dtype=np.float32) / 255.0)
        )
        means.append(lab.mean(axis=(1, 2)))
        stds.append(lab.std(axis=(1, 2)))
    return {
        "mean": np.concatenate(means).mean(axis=0).tolist(),
        "std": np.concatenate(stds).mean(axis=0).tolist(),
    }


@keras.saving.register_keras_serializable(package="bloodbench")
class ReinhardNormalization(keras.layers.Layer):
    """``uint8``-valued RGB in, RGB in 0-255 out, each image's L*a*b* statistics mapped
    to ``target_mean``/``target_std`` (in training and inference alike)."""

    def __init__(self, target_mean, target_std, **kwargs):
        super().__init__(**kwargs)
        self.target_mean = [float(v) for v in target_mean]
        self.target_std = [float(v) for v in target_std]

    def call(self, x):
        lab = rgb_to_lab(ops.cast(x, "float32") / 255.0)
        mean = ops.mean(lab, axis=(1, 2), keepdims=True)
        std = ops.std(lab, axis=(1, 2), keepdims=True)
        out = (lab - mean) / (std + 1e-3) * ops.convert_to_tensor(
            np.array(self.target_std, np.float32)
        ) + np.array(self.target_mean, np.float32)
        return lab_to_rgb(out) * 255.0

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "target_mean": self.target_mean,
            "target_std": self.target_std,
        }
