"""Test-time augmentation: the one list of ``[predictor] tta`` names and their views.

Read by the config schema, ``bench evaluate --tta``, the predictor and its manifest check.
"""

from __future__ import annotations

import numpy as np

#: test-time augmentation: ``[predictor] tta`` -> the views averaged (each a function of an
#: (N, S, S, 3) batch). "flips": the image and its horizontal, vertical and double flips;
#: "d4": also the transposes (all 8 flips and 90-degree rotations).
TTA_VIEWS = {
    "none": ("identity",),
    "flips": ("identity", "flip_h", "flip_v", "rot180"),
    "d4": (
        "identity",
        "flip_h",
        "flip_v",
        "rot180",
        "transpose",
        "rot90",
        "rot270",
        "anti_transpose",
    ),
}
#: each view as a function of an (N, S, S, 3) batch
VIEWS = {
    "identity": lambda x: x,
    "flip_h": lambda x: x[:, :, ::-1],
    "flip_v": lambda x: x[:, ::-1],
    "rot180": lambda x: x[:, ::-1, ::-1],
    "transpose": lambda x: x.transpose(0, 2, 1, 3),
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "anti_transpose": lambda x: x[:, ::-1, ::-1].transpose(0, 2, 1, 3),
}


__all__ = ["TTA_VIEWS", "VIEWS"]
