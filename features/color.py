"""Colour: per-channel histograms and moments in RGB and HSV.

Stain colour carries information in Giemsa / May Grünwald-Giemsa smears (eosinophil
granules, basophil violet, cytoplasm blue) but also the acquisition's fingerprint (a
batch with another stain tone or background). A colour-only baseline shows how far
colour alone goes, i.e. how much of a benchmark a shortcut could explain.
"""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2hsv

from features.imageutil import as_rgb

SPACES = ("rgb", "hsv")


def _moments(ch: np.ndarray) -> list[float]:
    mean = float(ch.mean())
    std = float(ch.std())
    skew = float(np.mean(((ch - mean) / std) ** 3)) if std > 1e-8 else 0.0
    return [mean, std, skew]


def color_features(
    img: np.ndarray, bins: int = 16, spaces=SPACES, moments: bool = True
) -> np.ndarray:
    """Colour histograms and moments.

    Parameters
    ----------
    img : ``uint8`` RGB (H, W, 3) or grayscale (H, W) image.
    bins : histogram bins per channel over the channel's full range.
    spaces : colour spaces among ``"rgb"`` and ``"hsv"``; all channels are scaled to [0, 1].
    moments : add mean, standard deviation and skewness per channel.

    Returns
    -------
    1-D ``float32`` vector of length ``3 * len(spaces) * (bins + 3 * moments)``: per
    space, the three normalised channel histograms (each sums to 1), then per channel
    mean, std, skewness. Hue is treated as linear, not circular (its histogram is what
    carries information; pink/red hues near 0 and 1 stay apart).
    """
    bins = int(bins)
    if bins < 1:
        raise ValueError(f"color bins must be >= 1, got {bins}")
    bad = [s for s in spaces if s not in SPACES]
    if bad:
        raise ValueError(f"unknown colour space(s) {bad}; known: {list(SPACES)}")
    rgb = as_rgb(img).astype(np.float64) / 255.0
    hists, moms = [], []
    for space in spaces:
        chans = rgb if space == "rgb" else rgb2hsv(rgb)
        for c in range(3):
            ch = chans[..., c].ravel()
            h, _ = np.histogram(ch, bins=bins, range=(0.0, 1.0))
            hists.append(h / max(1, ch.size))
            if moments:
                moms.append(_moments(ch))
    parts = []
    k = 0
    for _ in spaces:  # group per space: 3 histograms, then 3 x (mean, std, skew)
        parts.extend(hists[k : k + 3])
        if moments:
            parts.extend(np.asarray(m) for m in moms[k : k + 3])
        k += 3
    return np.concatenate(parts).astype(np.float32)
