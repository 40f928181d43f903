"""Colour and pipeline invariance of model inputs, applied alike in training and prediction.

Two steps a dataset can ask for (``[data] smooth``, ``[patients] bag_colour``); a run
applies them to its decoded images before any candidate sees them, and a saved predictor
applies them to every image it is given (the first through its
:class:`core.images.Preprocessing` record, the second through its bag task's spec):

* :func:`smooth`: a Gaussian low-pass of each image at the model's input size. Cells exported
  by an analyser (about 360 px JPEGs) and the same cells re-encoded smaller (96 px, JPEG
  quality 90) differ mostly in the top octave: JPEG block noise and the resampling kernel's
  ringing. Colour histograms and texture statistics read exactly that octave; a sigma of
  about one input pixel removes it and leaves the cell's shape (benchmarks/README.md,
  "Patients on a new cohort").
* :func:`bag_colour`: per-bag (per-smear) colour normalisation. A patient's cells come
  from one smear, stained and photographed once: the bag's pooled statistics over all its
  cells' pixels are mapped to a fixed target, so each cell keeps its colour *relative to
  its own smear* and the smear's cast (stain batch, staining time, camera white balance)
  is removed. ``"rgb"``: each RGB channel's mean and spread (a camera's white balance and
  a stain's intensity act per channel, multiplicatively, and this undoes such a cast
  exactly); ``"reinhard"``: the CIE L*a*b* mean and spread (Reinhard et al. 2001). Only
  the bag's own pixels are used: nothing of another patient, and nothing fitted, enters a
  bag's transform.
* :func:`image_colour`: the same normalisation per image (``[data] colour_norm``): each
  image's own statistics mapped to the fixed target, so a lab's stain and camera cast is
  removed from every image alike, in training and in the predictor, for every candidate
  kind (features, frozen and fine-tuned transfer, scratch CNNs, a distilled student).
* :func:`bag_jitter`: stain augmentation drawn per bag: every training cell of a bag gets
  the same random per-channel gain, so no cast is a property of a diagnosis in training.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.color import lab2rgb, rgb2lab

#: the fixed L*a*b* target of :func:`bag_reinhard`: mean and spread of a typical
#: Romanowsky-stained smear imaged by a CellaVision-type analyser (the pooled statistics of
#: PBC and DeepAPL cells at 64 px, rounded: L 75-79 +- 17-19, a 11-13 +- 10, b 4-6 +- 15-16)
REINHARD_TARGET = {"mean": (76.0, 12.0, 5.0), "std": (18.0, 10.0, 15.0)}
#: the fixed RGB target of ``"rgb"``: per-channel mean and spread (PBC and DeepAPL cells
#: at 64 px, pooled and rounded)
RGB_TARGET = {"mean": (205.0, 180.0, 200.0), "std": (40.0, 50.0, 30.0)}
#: the largest ``[data] smooth`` (a ``Preprocessing`` record's ``smooth``), in pixels
MAX_SMOOTH = 5.0
#: ``[patients] bag_colour`` methods
BAG_COLOUR = ("none", "reinhard", "rgb")
#: ``[data] colour_norm`` methods (per image)
COLOUR_NORM = BAG_COLOUR
_CHUNK = 512


def smooth(images: np.ndarray, sigma: float) -> np.ndarray:
    """``uint8`` images (N, H, W, 3) (or one (H, W, 3)) low-passed by a Gaussian of
    ``sigma`` pixels in each spatial direction (reflect at the border); ``sigma`` 0
    returns them unchanged."""
    if not sigma:
        return images
    images = np.asarray(images)
    one = images.ndim == 3
    x = images[None] if one else images
    out = np.empty(x.shape, np.uint8)
    for s in range(0, len(x), _CHUNK):
        f = gaussian_filter(
            x[s : s + _CHUNK].astype(np.float32), (0, sigma, sigma, 0), mode="reflect"
        )
        out[s : s + _CHUNK] = np.clip(np.round(f), 0, 255).astype(np.uint8)
    return out[0] if one else out


def lab_moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled L*a*b* mean and spread over every pixel of ``images`` (N, H, W, 3)."""
    n = 0
    s1 = np.zeros(3)
    s2 = np.zeros(3)
    for s in range(0, len(images), _CHUNK):
        lab = rgb2lab(np.asarray(images[s : s + _CHUNK])).reshape(-1, 3)
        n += len(lab)
        s1 += lab.sum(0)
        s2 += (lab.astype(np.float64) ** 2).sum(0)
    mean = s1 / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean**2, 0.0))
    return mean, std


def reinhard_map(images: np.ndarray, mean, std, target=REINHARD_TARGET) -> np.ndarray:
    """``images`` with L*a*b* statistics ``mean``/``std`` mapped onto ``target``."""
    mean, std = np.asarray(mean, float), np.maximum(np.asarray(std, float), 1e-3)
    t_mean, t_std = np.asarray(target["mean"], float), np.asarray(target["std"], float)
    out = np.empty(np.shape(images), np.uint8)
    for s in range(0, len(images), _CHUNK):
        lab = rgb2lab(np.asarray(images[s : s + _CHUNK]))
        lab = (lab - mean) / std * t_std + t_mean
        lab[..., 0] = np.clip(lab[..., 0], 0, 100)
        out[s : s + _CHUNK] = np.clip(np.round(lab2rgb(lab) * 255), 0, 255).astype(np.uint8)
    return out


def bag_reinhard(images: np.ndarray, bag_of_row, target=REINHARD_TARGET) -> np.ndarray:
    """Each bag's images mapped from the bag's pooled L*a*b* statistics onto ``target``
    (a new array; rows in the same order)."""
    images = np.asarray(images)
    bag_of_row = np.asarray(bag_of_row)
    out = np.empty_like(images)
    for b in np.unique(bag_of_row):
        rows = np.flatnonzero(bag_of_row == b)
        mean, std = lab_moments(images[rows])
        out[rows] = reinhard_map(images[rows], mean, std, target)
    return out


def bag_rgb(images: np.ndarray, bag_of_row, target=RGB_TARGET) -> np.ndarray:
    """Each bag's images with every RGB channel's pooled mean and spread (over all the
    bag's pixels) mapped onto ``target``."""
    images = np.asarray(images)
    bag_of_row = np.asarray(bag_of_row)
    t_mean, t_std = np.asarray(target["mean"]), np.asarray(target["std"])
    out = np.empty_like(images)
    for b in np.unique(bag_of_row):
        rows = np.flatnonzero(bag_of_row == b)
        x = images[rows].astype(np.float32)
        flat = x.reshape(-1, 3)
        mean, std = flat.mean(0), np.maximum(flat.std(0), 1e-3)
        out[rows] = np.clip(np.round((x - mean) / std * t_std + t_mean), 0, 255).astype(np.uint8)
    return out


def image_colour(images: np.ndarray, method: str) -> np.ndarray:
    """``uint8`` images (N, H, W, 3) (or one (H, W, 3)), each mapped from its own colour
    statistics onto the fixed target: ``"reinhard"`` (L*a*b* mean and spread,
    :data:`REINHARD_TARGET`), ``"rgb"`` (per-channel mean and spread, :data:`RGB_TARGET`),
    ``"none"`` unchanged."""
    if method == "none":
        return images
    if method not in COLOUR_NORM:
        raise ValueError(f"unknown colour normalisation '{method}'; known: {list(COLOUR_NORM)}")
    images = np.asarray(images)
    one = images.ndim == 3
    x = images[None] if one else images
    out = np.empty(x.shape, np.uint8)
    target = REINHARD_TARGET if method == "reinhard" else RGB_TARGET
    t_mean, t_std = np.asarray(target["mean"], float), np.asarray(target["std"], float)
    for s in range(0, len(x), _CHUNK):
        chunk = np.asarray(x[s : s + _CHUNK])
        v = rgb2lab(chunk) if method == "reinhard" else chunk.astype(np.float64)
        mean = v.mean(axis=(1, 2), keepdims=True)
        std = np.maximum(v.std(axis=(1, 2), keepdims=True), 1e-3)
        v = (v - mean) / std * t_std + t_mean
        if method == "reinhard":
            v[..., 0] = np.clip(v[..., 0], 0, 100)
            v = lab2rgb(v) * 255
        out[s : s + _CHUNK] = np.clip(np.round(v), 0, 255).astype(np.uint8)
    return out[0] if one else out


def bag_colour(images: np.ndarray, bag_of_row, method: str) -> np.ndarray:
    """``[patients] bag_colour`` (:data:`BAG_COLOUR`) applied to ``images`` by bag."""
    if method == "none":
        return images
    if method == "reinhard":
        return bag_reinhard(images, bag_of_row)
    if method == "rgb":
        return bag_rgb(images, bag_of_row)
    raise ValueError(f"unknown bag colour normalisation '{method}'; known: {list(BAG_COLOUR)}")


def bag_jitter(images: np.ndarray, bag_of_row, strength: float, seed: int) -> np.ndarray:
    """Each bag's images times one random per-channel gain, ``exp(N(0, strength))``
    (and one random brightness offset, ``N(0, 40 * strength)`` grey levels), drawn per bag
    from ``seed``: training-time stain augmentation that keeps a bag's cells consistent
    with each other, as one smear's are."""
    if not strength:
        return images
    images = np.asarray(images)
    bag_of_row = np.asarray(bag_of_row)
    rng = np.random.default_rng(seed)
    names, inverse = np.unique(bag_of_row, return_inverse=True)
    gains = np.exp(rng.normal(0, strength, (len(names), 3))).astype(np.float32)
    offsets = rng.normal(0, 40 * strength, len(names)).astype(np.float32)
    out = np.empty_like(images)
    for s in range(0, len(images), _CHUNK):
        i = inverse[s : s + _CHUNK]
        x = (
            images[s : s + _CHUNK].astype(np.float32) * gains[i][:, None, None, :]
            + offsets[i][:, None, None, None]
        )
        out[s : s + _CHUNK] = np.clip(np.round(x), 0, 255).astype(np.uint8)
    return out


__all__ = [
    "smooth",
    "bag_reinhard",
    "image_colour",
    "COLOUR_NORM",
    "bag_rgb",
    "bag_colour",
    "bag_jitter",
    "lab_moments",
    "reinhard_map",
    "REINHARD_TARGET",
    "RGB_TARGET",
    "BAG_COLOUR",
    "MAX_SMOOTH",
]
