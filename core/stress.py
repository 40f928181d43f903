"""Simulated lab shifts: the test images of a fold as another lab's stain or camera might
show them.

A model that holds up when a fold's test images are re-stained is likelier to hold up on
another lab's smears than one that only scores well on its own lab's colours. The run
scores every fold model on its test fold under each configured shift (``[stress]``) beside
the clean images; the leaderboard reports the accuracy under shift, ensembles can be fitted
on the shifted rows too (``[ensembles.NAME] stress = true``), and the predictor can be the
most shift-robust of the best ensembles (``[predictor] ensemble = "robust"``). No external
image is used: the shifts are generic, fixed in advance, and seeded per image.

Shifts (each draws its parameters per image from ``(seed, row)``, so an image is shifted
the same way whichever fold, candidate or process scores it):

* ``"stain"``: stain jitter in haematoxylin-eosin-DAB optical density space (Tellez et al.,
  *Medical Image Analysis* 2019: each stain channel scaled by U(0.8, 1.2) and shifted by
  U(-0.01, 0.01)); Giemsa's azure and eosin separate along similar axes.
* ``"hue"``: hue rotated by U(-0.08, 0.08) of the circle, saturation scaled by U(0.7, 1.3)
  and brightness by U(0.85, 1.15) in HSV.
* ``"camera"``: another analyser's optics, not its stain: magnification scaled by a
  log-uniform factor in [0.8, 1.25] about the image centre (bilinear, borders mirrored) and
  defocus, a Gaussian blur of sigma U(0, 1) px per 64 px of image side.
* ``"scale"``: another lab's framing: the image magnified by a log-uniform factor in
  [1.4, 2.2] about its centre, so the cell fills the frame as in labs that crop tightly
  around it (the profiles' central-half crop assumes PBC's wide framing).
"""

from __future__ import annotations

import numpy as np

COLOUR_SHIFTS = ("stain", "hue")
SHIFTS = (*COLOUR_SHIFTS, "camera", "scale")
_CHUNK = 256  # images converted at a time (float32 copies: a few tens of MB)


def _rngs(rows, seed: int):
    return [np.random.default_rng([int(seed), int(r)]) for r in rows]


def _stain(x: np.ndarray, rngs) -> np.ndarray:
    from skimage.color import hed2rgb, rgb2hed

    scale = np.stack([g.uniform(0.8, 1.2, 3) for g in rngs])[:, None, None, :]
    shift = np.stack([g.uniform(-0.01, 0.01, 3) for g in rngs])[:, None, None, :]
    return hed2rgb(rgb2hed(x) * scale + shift)


def _hue(x: np.ndarray, rngs) -> np.ndarray:
    from skimage.color import hsv2rgb, rgb2hsv

    p = np.stack(
        [[g.uniform(-0.08, 0.08), g.uniform(0.7, 1.3), g.uniform(0.85, 1.15)] for g in rngs]
    )[:, None, None, :]
    hsv = rgb2hsv(x)
    hsv[..., 0] = (hsv[..., 0] + p[..., 0]) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * p[..., 1], 0.0, 1.0)
    hsv[..., 2] = np.clip(hsv[..., 2] * p[..., 2], 0.0, 1.0)
    return hsv2rgb(hsv)


def _zoomed(x: np.ndarray, params) -> np.ndarray:
    """Each image magnified by ``zoom`` about its centre (bilinear, borders mirrored), then
    blurred by ``sigma`` px; ``params``: one ``(zoom, sigma)`` per image."""
    from scipy import ndimage

    _, h, w, _ = x.shape
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    out = np.empty_like(x)
    for i, (zoom, sigma) in enumerate(params):
        matrix = np.eye(2) / zoom  # output pixel -> input pixel, about the centre
        offset = centre - matrix @ centre
        for c in range(x.shape[-1]):
            plane = ndimage.affine_transform(
                x[i, ..., c], matrix, offset=offset, order=1, mode="mirror"
            )
            out[i, ..., c] = ndimage.gaussian_filter(plane, sigma) if sigma > 0 else plane
    return out


def _camera(x: np.ndarray, rngs) -> np.ndarray:
    h = x.shape[1]
    return _zoomed(
        x,
        [
            (
                float(np.exp(g.uniform(np.log(0.8), np.log(1.25)))),
                float(g.uniform(0.0, 1.0)) * h / 64.0,
            )
            for g in rngs
        ],
    )


def _scale(x: np.ndarray, rngs) -> np.ndarray:
    return _zoomed(x, [(float(np.exp(g.uniform(np.log(1.4), np.log(2.2)))), 0.0) for g in rngs])


_FUNCS = {"stain": _stain, "hue": _hue, "camera": _camera, "scale": _scale}


def check_shift(name: str) -> None:
    if name not in _FUNCS:
        raise ValueError(f"unknown simulated shift {name!r}; known: {list(SHIFTS)}")


def simulate(images: np.ndarray, shift: str, rows, seed: int = 0) -> np.ndarray:
    """``images`` (N, H, W, 3) ``uint8`` under simulated shift ``shift``; ``rows``: each
    image's row in the dataset (with ``seed``, what its random parameters are drawn from)."""
    check_shift(shift)
    images = np.asarray(images)
    rows = np.asarray(rows)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"simulate expects (N, H, W, 3) RGB images, got shape {images.shape}")
    if len(rows) != len(images):
        raise ValueError(f"{len(rows)} rows for {len(images)} images")
    out = np.empty(images.shape, dtype=np.uint8)
    for i in range(0, len(images), _CHUNK):
        x = np.asarray(images[i : i + _CHUNK], dtype=np.float32) / np.float32(255.0)
        y = _FUNCS[shift](x, _rngs(rows[i : i + _CHUNK], seed))
        out[i : i + _CHUNK] = np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)
    return out
