"""Small image helpers shared by the feature extractors."""

from __future__ import annotations

import numpy as np
from skimage.transform import resize


def as_rgb(img) -> np.ndarray:
    """``uint8`` (H, W, 3) view of ``img``; a (H, W) or (H, W, 1) grayscale image is repeated."""
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {img.shape}")
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img


def gray_uint8(img) -> np.ndarray:
    """Luminance (ITU-R 601) of an RGB image as ``uint8`` (H, W)."""
    f = as_rgb(img).astype(np.float32)
    g = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
    return np.clip(np.rint(g), 0, 255).astype(np.uint8)


def at_least(img: np.ndarray, size: int) -> np.ndarray:
    """``img`` upsampled (bilinear) so that both sides are at least ``size`` pixels."""
    h, w = img.shape[:2]
    if h >= size and w >= size:
        return img
    shape = (max(h, size), max(w, size)) + img.shape[2:]
    out = resize(
        img.astype(np.float32),
        shape,
        order=1,
        mode="edge",
        anti_aliasing=False,
        preserve_range=True,
    )
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
