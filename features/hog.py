"""Histogram of oriented gradients (scikit-image)."""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2gray
from skimage.feature import hog as _hog

from features.imageutil import as_rgb, at_least


def hog_features(
    img: np.ndarray,
    orientations: int = 9,
    pixels_per_cell: int = 8,
    cells_per_block: int = 2,
    channel: str = "gray",
) -> np.ndarray:
    """HOG descriptor of an RGB ``uint8`` image.

    Parameters
    ----------
    orientations, pixels_per_cell, cells_per_block : as in :func:`skimage.feature.hog`
        (cells and blocks are square).
    channel : ``"gray"`` (luminance) or ``"rgb"`` (per pixel, the channel with the
        strongest gradient, as in Dalal and Triggs).

    Returns
    -------
    1-D ``float32`` vector of length ``orientations * cells_per_block**2 * n_blocks**2`` with
    ``n_blocks = size // pixels_per_cell - cells_per_block + 1`` (at least 1: an image
    smaller than one block, ``pixels_per_cell * cells_per_block``, is first upsampled to
    that size). Grayscale (H, W) input is accepted.
    """
    kw = dict(
        orientations=orientations,
        pixels_per_cell=(pixels_per_cell, pixels_per_cell),
        cells_per_block=(cells_per_block, cells_per_block),
        block_norm="L2-Hys",
        feature_vector=True,
    )
    img = at_least(as_rgb(img), pixels_per_cell * cells_per_block)
    if channel == "rgb":
        return _hog(img, channel_axis=-1, **kw).astype(np.float32)
    if channel != "gray":
        raise ValueError(f"hog channel must be 'gray' or 'rgb', got {channel!r}")
    return _hog(rgb2gray(img), **kw).astype(np.float32)
