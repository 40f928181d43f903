"""ImageNet backbones by name: any ``keras.applications`` model, plus EfficientNet-Lite0.

``build_backbone("MobileNetV2", input_size=96, weights=...)`` returns the backbone without
its top (``include_top=False``, no pooling: its output is the last convolutional feature
map) as a nested ``keras.Model`` named ``backbone``. Each backbone's own
``preprocess_input`` is applied by :class:`BackbonePreprocess`, a layer of the outer
model, so a saved model takes raw RGB values.

Weights
-------
``weights = "imagenet"``: Keras downloads the file once into ``~/.keras/models`` (needs a
network). ``weights = "path/to/file.weights.h5"``: a local Keras weights file (for
example from ``../shared/weights``); in ``benchmarks.toml`` a relative path is relative
to the config file's folder (resolved when the config is loaded), in Python to the
working directory. ``weights = "none"``: random initialisation (tests only).
A missing file, or a failed download, is a :class:`~core.errors.BenchError` naming
the file to provide; with ``weights_missing = "random"`` (a transfer candidate's
parameter, e.g. in the ``smoke`` profile, for a clone without ``../shared``) a missing
*file* instead gives a randomly initialised backbone and one warning line naming the file
(once per file; :func:`cnn.weights.local_weights`). Nothing is ever downloaded for a
missing file. Resolving the weights needs no Keras: :mod:`cnn.weights`.
"""

from __future__ import annotations

import copy
import importlib

import keras
from keras import layers

from cnn.weights import LITE, download_hint, min_input_size, resolve_weights
from core.errors import BenchError

_ALPHA = {"MobileNet", "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large"}


def known_backbones() -> list[str]:
    """Names usable as ``backbone``: the ``keras.applications`` models and EfficientNetLite0."""
    names = [
        n
        for n in dir(keras.applications)
        if n[0].isupper() and callable(getattr(keras.applications, n))
    ]
    return sorted(names + sorted(LITE))


def _constructor(name: str):
    if name in LITE:
        return None
    ctor = getattr(keras.applications, name, None)
    if ctor is None or not name[0].isupper() or not callable(ctor):
        raise BenchError(f"unknown backbone '{name}'; known: {', '.join(known_backbones())}")
    return ctor


def preprocess_module(name: str):
    """The ``keras.applications`` module whose ``preprocess_input`` fits backbone ``name``."""
    ctor = _constructor(name)
    if ctor is None:
        return None
    mod = ctor.__module__.rsplit(".", 1)[-1]  # e.g. keras.src.applications.mobilenet_v2
    return importlib.import_module(f"keras.applications.{mod}")


@keras.saving.register_keras_serializable(package="bloodbench")
class BackbonePreprocess(layers.Layer):
    """Apply backbone ``backbone``'s own ``keras.applications`` ``preprocess_input``.

    Takes RGB in [0, 255]. EfficientNet-Lite0 (and Keras' EfficientNets, whose
    ``preprocess_input`` is the identity) normalise inside the backbone.
    """

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self._module = preprocess_module(backbone)

    def call(self, inputs):
        x = keras.ops.cast(inputs, "float32")
        if self._module is None:
            return x
        return self._module.preprocess_input(x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}


def _efficientnet_lite0(input_shape):
    from keras.src.applications import efficientnet as ke  # private API, see SOURCE.md

    args = copy.deepcopy(ke.DEFAULT_BLOCKS_ARGS)
    for a in args:
        a["se_ratio"] = 0.0
    return ke.EfficientNet(
        1.0,
        1.0,
        224,
        0.2,
        activation="relu6",
        blocks_args=args,
        name="backbone",
        include_top=False,
        weights=None,
        input_shape=input_shape,
    )


def build_backbone(
    name: str,
    input_size: int,
    weights="imagenet",
    alpha: float = 1.0,
    weights_missing: str = "error",
):
    """The no-top backbone ``name`` on ``input_size`` px RGB, named ``backbone``.

    Parameters
    ----------
    name : a ``keras.applications`` model name (``"MobileNetV2"``, ``"ResNet50"``, ...)
        or ``"EfficientNetLite0"``.
    input_size : side of its input; must be at least :func:`min_input_size`.
    weights : ``"imagenet"``, a weights file path, or ``None``/``"none"``.
    alpha : width multiplier of the MobileNet families.
    weights_missing : ``"error"`` (default) or ``"random"``: what a missing weights file
        does (see :func:`resolve_weights`).
    """
    if input_size < min_input_size(name):
        raise BenchError(
            f"backbone {name} needs inputs of at least {min_input_size(name)} px, "
            f"got input_size = {input_size}"
        )
    ctor = _constructor(name)
    w = resolve_weights(weights, name, alpha, weights_missing)
    shape = (int(input_size), int(input_size), 3)
    if ctor is None:
        model = _efficientnet_lite0(shape)
        if w is not None:
            _load_file(model, w, name)
        return model
    kwargs = {"alpha": alpha} if name in _ALPHA else {}
    file_weights = w not in (None, "imagenet")
    try:
        model = ctor(
            include_top=False,
            weights=None if file_weights else w,
            input_shape=shape,
            name="backbone",
            **kwargs,
        )
    except Exception as exc:  # keras.utils.get_file: "URL fetch failure on <url>: ..."
        if w != "imagenet" or "http" not in str(exc).lower():
            raise
        raise BenchError(download_hint(name, exc)) from None
    if file_weights:
        _load_file(model, w, name)
    return model


def _short(exc) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__


def _load_file(model, path: str, name: str) -> None:
    try:
        model.load_weights(path)
    except Exception as exc:  # wrong architecture / alpha / corrupt file
        raise BenchError(
            f"backbone {name}: cannot load weights from {path}: {_short(exc)}"
        ) from None
