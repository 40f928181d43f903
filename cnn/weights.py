"""Which weights a backbone starts from, without importing Keras.

The facts about backbones that need no model: the smallest input each family accepts,
the families that normalise inside the model, the files of ``../shared/weights``, and
how a ``weights`` value resolves (``"imagenet"``, ``None`` for random, or a local file;
a missing file stops with one line naming it, or with ``weights_missing = "random"``
warns once and gives random weights). :mod:`cnn.backbones` (Keras) builds the backbones;
:mod:`cnn.transfer` and the runner's check before the work units use this module, so
that checking the weights starts no TensorFlow.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from core.errors import BenchError
from core.progress import warn

# Smallest input side each family accepts (keras.applications' own checks); others: 32.
MIN_SIZE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}
# Families that normalise inside the model: their preprocess_input is the identity.
LITE = {"EfficientNetLite0"}
# Files in ../shared/weights (see its SOURCE.md) for the backbones they fit.
SHARED_FILES = {
    ("MobileNetV2", 1.0): "mobilenet_v2_1.0_imagenet_notop.weights.h5",
    ("MobileNetV2", 0.35): "mobilenet_v2_0.35_imagenet_notop.weights.h5",
    ("EfficientNetLite0", 1.0): "efficientnet_lite0_imagenet_notop.weights.h5",
}
#: what a missing local weights file does (``weights_missing``): stop, or random weights
WEIGHTS_MISSING = ("error", "random")
WARNED_ENV = "BLOODBENCH_WARNED_WEIGHTS"  # missing files already warned about (os.pathsep)


def min_input_size(name: str) -> int:
    return MIN_SIZE.get(name, 32)


def effective_input_size(image_size: int, input_size, backbone: str) -> int:
    """``input_size`` (default: the image size), raised to the backbone's minimum."""
    return max(int(input_size or image_size), min_input_size(backbone))


def is_file_spec(weights) -> bool:
    """Whether ``weights`` names a local file (not ``"imagenet"``, not random)."""
    return weights is not None and str(weights).lower() not in ("none", "", "imagenet")


def missing_weights_file(weights) -> str | None:
    """The absolute path of ``weights`` when it names a local file that does not exist."""
    if not is_file_spec(weights):
        return None
    p = Path(os.path.expanduser(str(weights))).resolve()
    return None if p.is_file() else str(p)


def local_weights(weights, backbone: str, missing: str = "error") -> str | None:
    """The absolute path of the local weights file ``weights``.

    A file that does not exist is a one-line :class:`BenchError` naming it; with
    ``missing = "random"`` it is ``None`` (random initialisation) after one warning line
    naming it, once per file: the warned files are kept in ``$BLOODBENCH_WARNED_WEIGHTS``,
    which the work-unit processes a run spawns after its check inherit. No Keras import,
    so that the runner checks the files before the work units and stays small.
    """
    if missing not in WEIGHTS_MISSING:
        raise BenchError(f"weights_missing must be one of {list(WEIGHTS_MISSING)}, got {missing!r}")
    p = Path(os.path.expanduser(str(weights))).resolve()
    if p.is_file():
        return str(p)
    if missing == "random":
        warned = [f for f in os.environ.get(WARNED_ENV, "").split(os.pathsep) if f]
        if str(p) not in warned:
            os.environ[WARNED_ENV] = os.pathsep.join([*warned, str(p)])
            warn(
                f"backbone {backbone}: weights file not found: {p}; initialised randomly "
                '(weights_missing = "random"): not transfer learning, expect lower scores'
            )
        return None
    raise BenchError(
        f"backbone {backbone}: weights file not found: {p} (provide this file, "
        'e.g. from ../shared/weights, or set weights = "imagenet" on a machine '
        "with a network)"
    )


def resolve_weights(weights, name: str, alpha: float = 1.0, missing: str = "error"):
    """``"imagenet"``, ``None`` (random) or an existing absolute file path.

    A weights file that does not exist is a one-line :class:`BenchError` naming it, or,
    with ``missing = "random"``, ``None`` (random initialisation) after one warning line
    (:func:`local_weights`)."""
    if weights is None or str(weights).lower() in ("none", ""):
        return None
    if weights == "imagenet":
        if name in LITE:
            hint = SHARED_FILES.get((name, 1.0))
            raise BenchError(
                f"backbone {name}: Keras publishes no ImageNet weights for it; set "
                f"weights to a local file (e.g. ../shared/weights/{hint})"
            )
        return "imagenet"
    return local_weights(weights, name, missing)


def download_hint(name: str, exc) -> str:
    """The one line for a failed ImageNet download: the file to provide, and where."""
    m = re.search(r"https?://\S+?\.h5", str(exc))
    fname = m.group(0).rsplit("/", 1)[-1] if m else "its weights file"
    return (
        f"backbone {name}: cannot download ImageNet weights (offline?): put {fname} into "
        f"~/.keras/models, or set weights to a local .weights.h5 file (e.g. from "
        f"../shared/weights: {', '.join(sorted(set(SHARED_FILES.values())))})"
    )
