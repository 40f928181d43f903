"""Cell and nucleus segmentation, and shape features of both.

Stained smears (May Grünwald-Giemsa, Wright, Giemsa) colour a white blood cell blue-violet
and its nucleus dark violet, while red cells are pink and the background pale. The
segmentation uses that, with no learned parameters:

1. *cell*: a stain channel ``B - G`` (blue minus green, high on violet, low on pink and
   pale pixels), lightly smoothed, thresholded by Otsu with a floor
   (``median + 0.35 * (p99.5 - median)``: when the cell is small, as for a platelet,
   Otsu alone splits red-cell rims from background). Of the connected parts, the one
   nearest the image centre is kept (the cell of interest is centred in single-cell crops),
   its holes filled.
2. *nucleus*: the darker part of the cell: Otsu on the green channel over the cell's pixels.

Grayscale images (no stain colour: ``B - G`` is flat) use darkness ``255 - gray`` as the
stain channel. When nothing can be segmented (a blank image, a cell too small to measure)
the masks are empty and :func:`morphology_features` returns NaNs, which the baselines'
pipelines impute. Nothing here raises on a valid ``uint8`` RGB image.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops

#: Names of the values returned by :func:`morphology_features`, in order.
FEATURE_NAMES = (
    "cell_area",
    "cell_perimeter",
    "cell_eccentricity",
    "cell_solidity",
    "cell_circularity",
    "nucleus_area",
    "nucleus_perimeter",
    "nucleus_eccentricity",
    "nucleus_solidity",
    "nucleus_circularity",
    "nucleus_lobes",
    "nucleus_to_cell_ratio",
)
MIN_FRACTION = 0.005  # parts smaller than this fraction of the image are noise
MIN_PIXELS = 4


def _stain_channel(img: np.ndarray) -> np.ndarray:
    f = img.astype(np.float32)
    stain = f[..., 2] - f[..., 1]
    med = float(np.median(stain))
    if float(np.percentile(stain, 99.5)) - med < 10.0:  # no stain colour: use darkness
        stain = 255.0 - (0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2])
    return stain


def _threshold(values: np.ndarray) -> float | None:
    """Otsu with a floor; ``None`` when ``values`` hold no contrast."""
    lo, hi = float(np.median(values)), float(np.percentile(values, 99.5))
    if hi - lo < 1e-3 or np.ptp(values) < 1e-3:
        return None
    return max(float(threshold_otsu(values)), lo + 0.35 * (hi - lo))


def _central_part(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """The connected part of ``mask`` nearest the image centre (ties: the larger part)."""
    lab, n = ndi.label(mask)
    if n == 0:
        return np.zeros_like(mask)
    sizes = ndi.sum_labels(mask, lab, index=np.arange(1, n + 1))
    h, w = mask.shape
    yy, xx = np.mgrid[:h, :w]
    dist = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)
    nearest = ndi.minimum(dist, lab, index=np.arange(1, n + 1))
    ok = sizes >= min_pixels
    if not ok.any():
        return np.zeros_like(mask)
    order = np.lexsort((-sizes, nearest))  # nearest first, then larger
    best = next(i for i in order if ok[i])
    return lab == best + 1


def segment_cell(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the central cell and of its nucleus.

    Parameters
    ----------
    img : ``uint8`` array (H, W, 3) RGB, or (H, W) grayscale.

    Returns
    -------
    cell_mask, nucleus_mask : ``bool`` arrays (H, W); ``nucleus_mask`` lies inside
        ``cell_mask``. Both are all ``False`` when segmentation fails (blank or contrast-free
        image, no part large enough); the nucleus alone is empty when the cell shows no
        darker part.
    """
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    h, w = img.shape[:2]
    empty = np.zeros((h, w), dtype=bool)
    min_pixels = max(MIN_PIXELS, int(MIN_FRACTION * h * w))
    stain = ndi.gaussian_filter(_stain_channel(img), sigma=max(0.5, min(h, w) / 64))
    t = _threshold(stain)
    if t is None:
        return empty, empty.copy()
    cell = _central_part(stain > t, min_pixels)
    if not cell.any():
        return empty, empty.copy()
    cell = ndi.binary_fill_holes(cell)
    green = img[..., 1].astype(np.float32)
    inside = green[cell]
    if inside.size < 2 or np.ptp(inside) < 1e-3:
        return cell, empty.copy()
    nucleus = cell & (green <= threshold_otsu(inside))
    if nucleus.sum() < MIN_PIXELS or nucleus.all():
        nucleus = empty.copy()
    return cell, nucleus


def _shape(mask: np.ndarray, scale: float) -> list[float]:
    """area (fraction of the image), perimeter (/ scale), eccentricity, solidity, circularity."""
    props = regionprops(label(mask.astype(np.uint8)))
    if not props:
        return [np.nan] * 5
    p = max(props, key=lambda r: r.area)
    area = float(mask.sum())
    perim = float(sum(r.perimeter for r in props))
    circ = 4 * np.pi * area / perim**2 if perim > 0 else np.nan
    return [
        area / mask.size,
        perim / scale,
        float(p.eccentricity),
        float(p.solidity),
        float(min(circ, 1.0)) if np.isfinite(circ) else np.nan,
    ]


def morphology_features(img: np.ndarray) -> np.ndarray:
    """Shape of the central cell and its nucleus.

    Returns
    -------
    1-D ``float32`` vector of length 12 (:data:`FEATURE_NAMES`): for the cell and for the
    nucleus, area (fraction of the image), perimeter (in units of the image side),
    eccentricity and solidity of the largest part, circularity ``4 pi A / P^2``; then the
    number of nucleus lobes (connected parts) and the nucleus-to-cell area ratio. Values of a
    part that could not be segmented are NaN.
    """
    img = np.asarray(img)
    cell, nucleus = segment_cell(img)
    scale = float(np.mean(cell.shape))
    out = [np.nan] * len(FEATURE_NAMES)
    if cell.any():
        out[0:5] = _shape(cell, scale)
        if nucleus.any():
            out[5:10] = _shape(nucleus, scale)
            out[10] = float(label(nucleus).max())
            out[11] = float(nucleus.sum() / cell.sum())
    return np.asarray(out, dtype=np.float32)
