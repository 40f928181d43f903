"""Local binary pattern histograms (texture), several radii."""

from __future__ import annotations

import numpy as np
from skimage.feature import local_binary_pattern

from features.imageutil import gray_uint8


def lbp_features(img: np.ndarray, radii=(1, 2, 3), points: int = 8) -> np.ndarray:
    """Histograms of rotation-invariant uniform LBP codes of the luminance.

    Parameters
    ----------
    img : ``uint8`` RGB (H, W, 3) or grayscale (H, W) image.
    radii : radii (pixels) of the sampling circles; one histogram per radius.
    points : sampling points per circle (``P``).

    Returns
    -------
    1-D ``float32`` vector of length ``len(radii) * (points + 2)``: for each radius the
    normalised histogram of the ``points + 2`` codes of ``method="uniform"`` (``P + 1``
    uniform patterns and one bin for all non-uniform ones). Sums to 1 per radius.
    """
    points = int(points)
    if points < 1:
        raise ValueError(f"lbp points must be >= 1, got {points}")
    gray = gray_uint8(img)
    out = []
    for r in radii:
        if float(r) <= 0:
            raise ValueError(f"lbp radii must be > 0, got {r}")
        codes = local_binary_pattern(gray, points, float(r), method="uniform")
        hist = np.bincount(codes.astype(np.int64).ravel(), minlength=points + 2)[: points + 2]
        out.append(hist / max(1, codes.size))
    return np.concatenate(out).astype(np.float32)
