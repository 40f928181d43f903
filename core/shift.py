"""Are these images like the training images? A per-image and per-batch shift score.

A saved predictor keeps a compact description of its training images: the mean and
covariance of a per-image colour descriptor (:func:`descriptor`: channel means, spreads
and percentiles in RGB and in optical density, where stain lives), and the distribution of
the training images' own Mahalanobis distances to that mean. A new image's **shift
score** is the share of training images that lie closer to the mean than it does (0.5:
typical; 0.999: further out than 99.9 % of the training images). A batch is flagged out of
distribution when more than ``batch_share`` of its images score above ``image_level``.

Nothing here uses labels; the description is fitted on the training images only.
"""

from __future__ import annotations

import numpy as np

VERSION = 1
IMAGE_LEVEL = 0.99  # an image is "out" when further out than 99 % of training images
BATCH_SHARE = 0.5  # a batch is flagged when more than half of its images are out


def descriptor(images: np.ndarray) -> np.ndarray:
    """(N, D) ``float64`` colour descriptor of (N, H, W, 3) ``uint8`` images."""
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1, 3) / 255.0
    od = -np.log(np.clip(x, 1.0 / 255.0, 1.0))  # optical density: stain amounts
    parts = []
    for arr in (x, od):
        parts += [arr.mean(axis=1), arr.std(axis=1)]
        parts += list(np.percentile(arr, [10, 50, 90], axis=1))
    return np.concatenate(parts, axis=1)


class ShiftReference:
    """The training images' description; :meth:`score` places new images against it."""

    def __init__(self, mean, precision, reference):
        self.mean = np.asarray(mean, dtype=np.float64)
        self.precision = np.asarray(precision, dtype=np.float64)
        self.reference = np.sort(np.asarray(reference, dtype=np.float64))

    @classmethod
    def fit(cls, images: np.ndarray, max_images: int = 5000, seed: int = 0) -> "ShiftReference":
        """Describe ``images`` (a seeded sample of at most ``max_images``)."""
        images = np.asarray(images) if not isinstance(images, np.ndarray) else images
        rows = np.arange(len(images))
        if len(rows) > max_images:
            rows = np.sort(np.random.default_rng(seed).choice(rows, max_images, replace=False))
        d = np.concatenate(
            [descriptor(np.asarray(images[rows[i : i + 512]])) for i in range(0, len(rows), 512)]
        )
        mean = d.mean(axis=0)
        cov = np.cov(d, rowvar=False) + 1e-6 * np.eye(d.shape[1])  # ridge: never singular
        obj = cls(mean, np.linalg.pinv(cov), [])
        obj.reference = np.sort(obj.distance(d))
        return obj

    def distance(self, d: np.ndarray) -> np.ndarray:
        z = d - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", z, self.precision, z), 0.0))

    def score(self, images: np.ndarray) -> np.ndarray:
        """Per image, the share of training images closer to the training mean (0-1)."""
        if not len(images):
            return np.zeros(0)
        dist = self.distance(descriptor(images))
        return np.searchsorted(self.reference, dist, side="right") / len(self.reference)

    @staticmethod
    def batch_summary(
        scores: np.ndarray, image_level: float = IMAGE_LEVEL, batch_share: float = BATCH_SHARE
    ) -> dict:
        """Share of images beyond ``image_level``, median score, and the flag."""
        scores = np.asarray(scores, dtype=np.float64)
        share = float(np.mean(scores > image_level)) if len(scores) else 0.0
        return {
            "n": int(len(scores)),
            "median_score": float(np.median(scores)) if len(scores) else float("nan"),
            "share_out": share,
            "image_level": image_level,
            "flagged": bool(share > batch_share),
        }

    def to_dict(self) -> dict:
        # the reference distances as 101 quantiles: compact, enough for a percentile
        q = np.quantile(self.reference, np.linspace(0, 1, 1001))
        return {
            "version": VERSION,
            "descriptor": "RGB and optical-density means, spreads and "
            "10/50/90th percentiles per channel",
            "mean": self.mean.tolist(),
            "precision": self.precision.tolist(),
            "reference_quantiles": q.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ShiftReference":
        if d.get("version") != VERSION:
            raise ValueError(f"shift reference version {d.get('version')} is not {VERSION}")
        return cls(d["mean"], d["precision"], d["reference_quantiles"])
