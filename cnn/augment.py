"""Real-time augmentation as Keras preprocessing layers inside the model.

The layers are part of the model, so they run on every training batch and are no-ops at
inference (``training=False``: ``predict``, ``model(x)``, the saved predictor). They act on
RGB values in [0, 255], right after the model's ``uint8`` input.

A spec is a preset name or a table of settings (missing keys are off)::

    augment = "default"
    augment = { flip = true, rot90 = true, zoom = 0.1, translate = 0.05,
                brightness = 0.1, contrast = 0.1, hue = 0.02, saturation = 0.1 }

* ``flip`` random horizontal and vertical flips; ``rot90`` random transposition, which
  with the flips gives all eight 90-degree rotations and reflections (blood cells have
  no orientation);
* ``zoom`` / ``translate``: fraction of the side (reflect padding);
* ``brightness`` / ``contrast`` / ``hue`` / ``saturation``: jitter strengths that mimic
  stain and illumination differences between slides (each in [0, 1); ``hue = h`` turns
  the hue wheel by up to +-h/2, ``saturation = s`` scales saturation by a factor drawn
  in [(1 - s)/(1 + s), (1 + s)/(1 - s)]: already the layers' full ranges).

Stain and colour robustness (cross-lab shift: another stain batch, another scanner):

* ``hed``: HED-space stain jitter (Tellez et al., 2018): RGB to optical density,
  projected on scikit-image's H-E-DAB stain matrix, each stain channel multiplied by
  U(1 - hed, 1 + hed) and shifted by U(-hed_bias, hed_bias), back to RGB
  (:class:`RandomHEDJitter`); ``hed_bias`` defaults to ``hed``. Tellez's "HED-light" is
  0.05, "HED-strong" 0.2. The H&E matrix is not fitted to May-Grunwald-Giemsa/Wright
  stains: it serves as a fixed basis of optical-density space, so the jitter perturbs
  stain concentrations along three non-orthogonal colour directions;
* ``grayscale``: probability in [0, 1] that an image is turned grey (luma, on 3 channels);
* ``blur``: Gaussian blur with sigma drawn in U(0, blur) pixels per image, blur in [0, 3];
* ``jpeg``: probability in [0, 1] that an image is re-encoded as JPEG at a quality drawn
  in [30, 95] (TensorFlow's JPEG codec, image by image: CPU only, and the model then
  trains without XLA).

The preset ``"stain"`` is flips + rot90 + ``hed`` 0.1 + ``hue`` 0.1 + ``saturation`` 0.3
+ ``grayscale`` 0.1 + ``blur`` 1.0; ``"robust"`` adds scale and illumination to it
(``zoom`` 0.2, ``translate`` 0.05, ``brightness`` and ``contrast`` 0.2: another
analyser's magnification and lamp); ``"colour"`` is flips + rot90 + ``hue`` 0.1 +
``saturation`` 0.3 alone (the stain's colour, with no change of its optical density, no
grey and no blur: what fine-tuned ImageNet backbones gained from, benchmarks/README.md).
A spec that uses any of the five keys above ends with a
clip to [0, 255] (:class:`ClipPixels`: Keras' ``RandomSaturation`` can return negative values).
The other presets, and tables without these keys, are unchanged.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers
from skimage.color import hed_from_rgb, rgb_from_hed

from core.errors import BenchError

PRESETS: dict[str, dict] = {
    "none": {},
    "flips": {"flip": True, "rot90": True},
    "light": {"flip": True, "rot90": True, "brightness": 0.05, "contrast": 0.05},
    "default": {
        "flip": True,
        "rot90": True,
        "zoom": 0.1,
        "translate": 0.05,
        "brightness": 0.1,
        "contrast": 0.1,
        "hue": 0.02,
        "saturation": 0.1,
    },
    "strong": {
        "flip": True,
        "rot90": True,
        "zoom": 0.2,
        "translate": 0.1,
        "brightness": 0.2,
        "contrast": 0.2,
        "hue": 0.05,
        "saturation": 0.2,
    },
    "stain": {
        "flip": True,
        "rot90": True,
        "hed": 0.1,
        "hue": 0.1,
        "saturation": 0.3,
        "grayscale": 0.1,
        "blur": 1.0,
    },
    # the colour part of "stain" alone: hue and saturation
    "colour": {"flip": True, "rot90": True, "hue": 0.1, "saturation": 0.3},
    # "stain" plus scale and illumination: another lab's analyser, objective and lamp
    "robust": {
        "flip": True,
        "rot90": True,
        "zoom": 0.2,
        "translate": 0.05,
        "brightness": 0.2,
        "contrast": 0.2,
        "hed": 0.1,
        "hue": 0.1,
        "saturation": 0.3,
        "grayscale": 0.1,
        "blur": 1.0,
    },
}
KEYS = (
    "flip",
    "rot90",
    "zoom",
    "translate",
    "brightness",
    "contrast",
    "hue",
    "saturation",
    "hed",
    "hed_bias",
    "grayscale",
    "blur",
    "jpeg",
)
#: the keys of the stain and colour robustness layers (augmentations using them end
#: with a clip to [0, 255], see :class:`ClipPixels`)
STAIN_KEYS = ("hed", "hed_bias", "grayscale", "blur", "jpeg")
#: allowed values of the numeric keys: (low, high, high included); default [0, 1)
_RANGES = {"grayscale": (0.0, 1.0, True), "jpeg": (0.0, 1.0, True), "blur": (0.0, 3.0, True)}
#: JPEG qualities drawn by the ``jpeg`` key
JPEG_QUALITY = (30, 95)

# scikit-image's stain matrices (Ruifrok and Johnston 2001): rows of RGB_FROM_HED are the
# optical-density vectors of haematoxylin, eosin and DAB; HED_FROM_RGB is its inverse.
# Row-vector convention, as skimage.color.rgb2hed: stains = od @ HED_FROM_RGB.
RGB_FROM_HED = np.asarray(rgb_from_hed, dtype=np.float64)
HED_FROM_RGB = np.asarray(hed_from_rgb, dtype=np.float64)


class _RandomImageLayer(layers.Layer):
    """Base of the colour layers below: a seeded generator, shape kept, identity at
    inference (``training=False``)."""

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        if not training:
            return inputs
        return self.transform(keras.ops.cast(inputs, self.compute_dtype))

    def transform(self, x):  # pragma: no cover - interface
        raise NotImplementedError

    def _per_image(self, x, minval=0.0, maxval=1.0, channels=1):
        n = keras.ops.shape(x)[0]
        return keras.random.uniform(
            (n, 1, 1, channels), minval=minval, maxval=maxval, seed=self.seed_generator
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="bloodbench")
class RandomTranspose(_RandomImageLayer):
    """Swap height and width of each image with probability 1/2 (training only).

    Together with random horizontal and vertical flips this draws uniformly from the
    eight symmetries of the square (the 90-degree rotations and reflections).
    """

    def transform(self, x):
        coin = self._per_image(x) < 0.5
        return keras.ops.where(coin, keras.ops.transpose(x, (0, 2, 1, 3)), x)


@keras.saving.register_keras_serializable(package="bloodbench")
class RandomHEDJitter(_RandomImageLayer):
    """HED-space stain jitter (Tellez et al., 2018), per image, training only.

    RGB values ``x`` in [0, 255] become optical densities ``od = -ln((x + 1) / 256)``
    (0 for white; exactly invertible), are projected on the stain basis
    (``od @ HED_FROM_RGB``), each of the three stain channels is multiplied by
    U(1 - ``sigma``, 1 + ``sigma``) and shifted by U(-``bias``, ``bias``), then mapped back
    (``@ RGB_FROM_HED``, ``x = 256 exp(-od) - 1``) and clipped to [0, 255]. With
    ``sigma = bias = 0`` the layer returns its input (up to float rounding).
    """

    def __init__(self, sigma=0.05, bias=0.05, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.sigma = float(sigma)
        self.bias = float(bias)

    def transform(self, x):
        ops = keras.ops
        dt = self.compute_dtype
        od = -ops.log((x + 1.0) / 256.0)
        stains = ops.einsum("nhwc,cd->nhwd", od, ops.convert_to_tensor(HED_FROM_RGB, dt))
        alpha = self._per_image(x, 1.0 - self.sigma, 1.0 + self.sigma, channels=3)
        beta = self._per_image(x, -self.bias, self.bias, channels=3)
        od = ops.einsum(
            "nhwd,dc->nhwc", stains * alpha + beta, ops.convert_to_tensor(RGB_FROM_HED, dt)
        )
        return ops.clip(256.0 * ops.exp(-od) - 1.0, 0.0, 255.0)

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma, "bias": self.bias}


@keras.saving.register_keras_serializable(package="bloodbench")
class RandomGrayscale(_RandomImageLayer):
    """Each image turned grey with probability ``rate`` (ITU-R 601 luma on all three
    channels), training only."""

    LUMA = (0.2989, 0.587, 0.114)

    def __init__(self, rate=0.1, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.rate = float(rate)

    def transform(self, x):
        ops = keras.ops
        luma = ops.convert_to_tensor(np.array(self.LUMA).reshape(3, 1), self.compute_dtype)
        gray = ops.matmul(x, luma)  # (n, h, w, 1)
        coin = self._per_image(x) < self.rate
        return ops.where(coin, ops.broadcast_to(gray, ops.shape(x)), x)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


@keras.saving.register_keras_serializable(package="bloodbench")
class RandomGaussianBlur(_RandomImageLayer):
    """Separable Gaussian blur with sigma drawn in U(0, ``max_sigma``) pixels per image
    (reflect padding; kernel radius ``ceil(3 max_sigma)``), training only."""

    def __init__(self, max_sigma=1.0, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.max_sigma = float(max_sigma)

    def transform(self, x):
        ops = keras.ops
        r = max(1, int(np.ceil(3 * self.max_sigma)))
        sigma = ops.maximum(self._per_image(x, 0.0, self.max_sigma)[:, 0, 0, :], 1e-3)  # (n, 1)
        taps = ops.convert_to_tensor(np.arange(-r, r + 1)[None, :], self.compute_dtype)
        w = ops.exp(-ops.square(taps) / (2.0 * ops.square(sigma)))  # (n, 2r+1)
        w = w / ops.sum(w, axis=1, keepdims=True)

        def smooth(img, axis):
            pad = [[0, 0]] * 4
            pad[axis] = [r, r]
            p = ops.pad(img, pad, mode="reflect")
            out = 0.0
            for k in range(2 * r + 1):
                end = k - 2 * r or None
                part = p[:, k:end] if axis == 1 else p[:, :, k:end]
                out = out + ops.reshape(w[:, k], (-1, 1, 1, 1)) * part
            return out

        return smooth(smooth(x, 1), 2)

    def get_config(self):
        return {**super().get_config(), "max_sigma": self.max_sigma}


@keras.saving.register_keras_serializable(package="bloodbench")
class RandomJPEG(_RandomImageLayer):
    """With probability ``rate`` an image is JPEG-encoded and decoded at a quality drawn
    uniformly in ``quality`` (inclusive), training only.

    TensorFlow's codec (``tf.image.adjust_jpeg_quality``) takes one image at a time: the
    batch goes through ``tf.map_fn`` (CPU kernels, no XLA: ``supports_jit = False``). The
    TensorFlow backend is required.
    """

    def __init__(self, rate=0.5, quality=JPEG_QUALITY, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.rate = float(rate)
        self.quality = tuple(int(q) for q in quality)
        self.supports_jit = False

    def transform(self, x):
        import tensorflow as tf

        lo, hi = self.quality
        u = self._per_image(x)[:, 0, 0, 0]
        apply = u < self.rate
        # the quality from the same draw, rescaled within the images that are re-encoded
        frac = u / max(self.rate, 1e-6)
        q = tf.cast(tf.minimum(lo + tf.floor(frac * (hi - lo + 1)), hi), tf.int32)
        xu = tf.cast(tf.round(tf.clip_by_value(x, 0.0, 255.0)), tf.uint8)

        def one(args):
            img, quality, on = args
            return tf.cond(on, lambda: tf.image.adjust_jpeg_quality(img, quality), lambda: img)

        out = tf.map_fn(
            one, (xu, q, apply), fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8)
        )
        out = tf.ensure_shape(out, xu.shape)
        return tf.where(apply[:, None, None, None], tf.cast(out, x.dtype), x)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "quality": list(self.quality)}


@keras.saving.register_keras_serializable(package="bloodbench")
class ClipPixels(layers.Layer):
    """Clip values to [0, 255] in training; the identity at inference.

    Keras' ``RandomSaturation`` on [0, 255] values clips the saturation to [0, 255]
    instead of [0, 1], so over-saturated pixels come out negative (down to about -100 with
    ``saturation = 0.3``). Augmentations that use the stain keys end with this layer; the
    older specs keep their exact behaviour.
    """

    def call(self, inputs, training=False):
        if not training:
            return inputs
        return keras.ops.clip(inputs, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape


def resolve_spec(spec) -> dict:
    """The settings table of ``spec`` (preset name, table, ``True``/``False``/``None``)."""
    if spec is None or spec is False:
        return {}
    if spec is True:
        spec = "default"
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise BenchError(
                f"augment: unknown preset '{spec}'; known: {sorted(PRESETS)} "
                f"or a table with keys {', '.join(KEYS)}"
            )
        return dict(PRESETS[spec])
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(KEYS))
        if unknown:
            raise BenchError(f"augment: unknown key(s) {unknown}; known: {list(KEYS)}")
        for k, v in spec.items():
            if k in ("flip", "rot90"):
                continue
            lo, hi, closed = _RANGES.get(k, (0.0, 1.0, False))
            ok = isinstance(v, (int, float)) and lo <= v and (v <= hi if closed else v < hi)
            if not ok:
                raise BenchError(
                    f"augment: '{k}' must be a number in [{lo:g}, {hi:g}"
                    f"{']' if closed else ')'}, got {v!r}"
                )
        return dict(spec)
    raise BenchError(f"augment must be a preset name or a table, got {spec!r}")


def build_augmentation(spec, seed: int | None = None, name: str = "augment"):
    """A ``keras.Sequential`` of random layers for ``spec``, or ``None`` when it is empty.

    Parameters
    ----------
    spec : str, dict, bool or None
        See the module docstring.
    seed : int, optional
        Base seed of the layers' random generators.
    """
    s = resolve_spec(spec)
    seq = []

    def sd(i):
        return None if seed is None else int(seed) + i

    if s.get("flip"):
        seq.append(layers.RandomFlip("horizontal_and_vertical", seed=sd(1), name="aug_flip"))
    if s.get("rot90"):
        seq.append(RandomTranspose(seed=sd(2), name="aug_rot90"))
    if s.get("zoom"):
        seq.append(layers.RandomZoom(s["zoom"], fill_mode="reflect", seed=sd(3), name="aug_zoom"))
    if s.get("translate"):
        seq.append(
            layers.RandomTranslation(
                s["translate"],
                s["translate"],
                fill_mode="reflect",
                seed=sd(4),
                name="aug_translate",
            )
        )
    if s.get("hed") or s.get("hed_bias"):
        sigma = float(s.get("hed", 0.0))
        seq.append(
            RandomHEDJitter(sigma, float(s.get("hed_bias", sigma)), seed=sd(9), name="aug_hed")
        )
    if s.get("brightness"):
        seq.append(
            layers.RandomBrightness(
                s["brightness"], value_range=(0, 255), seed=sd(5), name="aug_brightness"
            )
        )
    if s.get("contrast"):
        seq.append(
            layers.RandomContrast(
                s["contrast"], value_range=(0, 255), seed=sd(6), name="aug_contrast"
            )
        )
    if s.get("hue"):
        seq.append(layers.RandomHue(s["hue"], value_range=(0, 255), seed=sd(7), name="aug_hue"))
    if s.get("saturation"):
        # RandomSaturation's factor is a range in [0, 1] with 0.5 = unchanged
        f = float(s["saturation"]) / 2
        seq.append(
            layers.RandomSaturation(
                (0.5 - f, 0.5 + f), value_range=(0, 255), seed=sd(8), name="aug_saturation"
            )
        )
    if s.get("grayscale"):
        seq.append(RandomGrayscale(s["grayscale"], seed=sd(10), name="aug_grayscale"))
    if s.get("blur"):
        seq.append(RandomGaussianBlur(s["blur"], seed=sd(11), name="aug_blur"))
    if s.get("jpeg"):
        seq.append(RandomJPEG(s["jpeg"], seed=sd(12), name="aug_jpeg"))
    if seq and any(s.get(k) for k in STAIN_KEYS):
        seq.append(ClipPixels(name="aug_clip"))
    if not seq:
        return None
    return keras.Sequential(seq, name=name)
