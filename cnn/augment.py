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
  stain and illumination differences between slides.
"""

from __future__ import annotations

import keras
from keras import layers

from core.errors import BenchError

PRESETS: dict[str, dict] = {
    "none": {},
    "flips": {"flip": True, "rot90": True},
    "light": {"flip": True, "rot90": True, "brightness": 0.05, "contrast": 0.05},
    "default": {"flip": True, "rot90": True, "zoom": 0.1, "translate": 0.05,
                "brightness": 0.1, "contrast": 0.1, "hue": 0.02, "saturation": 0.1},
    "strong": {"flip": True, "rot90": True, "zoom": 0.2, "translate": 0.1,
               "brightness": 0.2, "contrast": 0.2, "hue": 0.05, "saturation": 0.2},
}
KEYS = ("flip", "rot90", "zoom", "translate", "brightness", "contrast", "hue", "saturation")


@keras.saving.register_keras_serializable(package="bloodbench")
class RandomTranspose(layers.Layer):
    """Swap height and width of each image with probability 1/2 (training only).

    Together with random horizontal and vertical flips this draws uniformly from the
    eight symmetries of the square (the 90-degree rotations and reflections).
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        if not training:
            return inputs
        ops = keras.ops
        n = ops.shape(inputs)[0]
        coin = keras.random.uniform((n, 1, 1, 1), seed=self.seed_generator) < 0.5
        return ops.where(coin, ops.transpose(inputs, (0, 2, 1, 3)), inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def resolve_spec(spec) -> dict:
    """The settings table of ``spec`` (preset name, table, ``True``/``False``/``None``)."""
    if spec is None or spec is False:
        return {}
    if spec is True:
        spec = "default"
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise BenchError(f"augment: unknown preset '{spec}'; known: {sorted(PRESETS)} "
                             f"or a table with keys {', '.join(KEYS)}")
        return dict(PRESETS[spec])
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(KEYS))
        if unknown:
            raise BenchError(f"augment: unknown key(s) {unknown}; known: {list(KEYS)}")
        for k, v in spec.items():
            if k not in ("flip", "rot90") and not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise BenchError(f"augment: '{k}' must be a number in [0, 1), got {v!r}")
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
        seq.append(layers.RandomTranslation(s["translate"], s["translate"], fill_mode="reflect",
                                            seed=sd(4), name="aug_translate"))
    if s.get("brightness"):
        seq.append(layers.RandomBrightness(s["brightness"], value_range=(0, 255), seed=sd(5),
                                           name="aug_brightness"))
    if s.get("contrast"):
        seq.append(layers.RandomContrast(s["contrast"], value_range=(0, 255), seed=sd(6),
                                         name="aug_contrast"))
    if s.get("hue"):
        seq.append(layers.RandomHue(s["hue"], value_range=(0, 255), seed=sd(7), name="aug_hue"))
    if s.get("saturation"):
        # RandomSaturation's factor is a range in [0, 1] with 0.5 = unchanged
        f = float(s["saturation"]) / 2
        seq.append(layers.RandomSaturation((0.5 - f, 0.5 + f), value_range=(0, 255),
                                           seed=sd(8), name="aug_saturation"))
    if not seq:
        return None
    return keras.Sequential(seq, name=name)
