"""Grey-level co-occurrence (Haralick) texture properties."""

from __future__ import annotations

import numpy as np
from skimage.feature import graycomatrix, graycoprops

from features.imageutil import gray_uint8

PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")


def glcm_features(
    img: np.ndarray, distances=(1, 2, 4), angles: int = 4, levels: int = 32, props=PROPS
) -> np.ndarray:
    """GLCM properties of the luminance over several distances and angles.

    Parameters
    ----------
    img : ``uint8`` RGB (H, W, 3) or grayscale (H, W) image.
    distances : pixel offsets.
    angles : number of directions, evenly spaced in [0, pi) (4: 0, 45, 90, 135 degrees).
    levels : grey levels after quantisation (fewer levels: a denser, more stable matrix).
    props : properties of :func:`skimage.feature.graycoprops`.

    Returns
    -------
    1-D ``float32`` vector of length ``len(props) * len(distances) * angles``, ordered
    property-major, then distance, then angle. The matrix is symmetric and normalised. An
    offset longer than the image has no pixel pairs: its values are NaN (imputed later).
    """
    levels, angles = int(levels), int(angles)
    if not 2 <= levels <= 256:
        raise ValueError(f"glcm levels must be in [2, 256], got {levels}")
    if angles < 1:
        raise ValueError(f"glcm angles must be >= 1, got {angles}")
    unknown = [p for p in props if p not in PROPS]
    if unknown:
        raise ValueError(f"unknown glcm properties {unknown}; known: {list(PROPS)}")
    gray = gray_uint8(img)
    q = (gray.astype(np.uint16) * levels // 256).astype(np.uint8)
    theta = [np.pi * k / angles for k in range(angles)]
    m = graycomatrix(
        q,
        distances=[int(d) for d in distances],
        angles=theta,
        levels=levels,
        symmetric=True,
        normed=True,
    )
    empty = m.sum(axis=(0, 1)) == 0  # (n_distances, n_angles)
    out = []
    for p in props:
        v = graycoprops(m, p).astype(np.float64)
        v[empty] = np.nan
        out.append(v.ravel())
    return np.concatenate(out).astype(np.float32)
