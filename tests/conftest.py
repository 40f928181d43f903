"""Shared fixtures: tiny, learnable image sets made on the fly, and an isolated cache."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("BLOODBENCH_TF_THREADS", "2")
# TensorFlow's thread pools are fixed at its first use in a process: fix them here, so an
# in-process run gets the same layout whichever test happened to touch TensorFlow first in
# this pytest worker (a bare tf.constant would leave TensorFlow's own default)
from cnn.runtime import configure  # noqa: E402

configure()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOY_CLASSES = ["disc", "square", "stripes"]


def toy_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A learnable RGB image: class 0 a red disc, 1 a blue square, 2 green stripes.

    Position, size and colour jitter vary; the background is noisy and pale like a smear.
    """
    img = rng.normal(225, 12, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    r = rng.uniform(0.18, 0.3) * size
    cy, cx = rng.uniform(r, size - r, 2)
    if label == 0:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        color = (170, 40, 60)
    elif label == 1:
        mask = (abs(yy - cy) < r * 0.9) & (abs(xx - cx) < r * 0.9)
        color = (50, 60, 170)
    else:
        period = max(3, size // 6)
        mask = ((xx + int(cx)) // period) % 2 == 0
        mask &= abs(yy - cy) < r * 1.3
        color = (60, 150, 70)
    img[mask] = np.array(color) + rng.normal(0, 15, (mask.sum(), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def toy_arrays(n_per_class: int = 20, size: int = 32, seed: int = 0, n_classes: int = 3):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    images = np.stack([toy_image(int(c), size, rng) for c in labels])
    return images, labels


def write_toy_folder(
    root: Path, n_per_class: int = 20, size: int = 32, seed: int = 0, fmt: str = "png"
) -> Path:
    images, labels = toy_arrays(n_per_class, size, seed)
    for i, (im, c) in enumerate(zip(images, labels)):
        d = root / TOY_CLASSES[c]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{TOY_CLASSES[c]}_{i:04d}.{fmt}")
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets one cache folder for the session, never the user's."""
    cache = tmp_path_factory.getbasetemp() / "bloodbench-cache"
    monkeypatch.setenv("BLOODBENCH_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory) -> Path:
    """3 classes x 20 PNGs of 32 px."""
    return write_toy_folder(tmp_path_factory.mktemp("toy") / "data")


TINY_CONFIG = """
[run]
seed = 0
folds = 3
profile = "tiny"

[data]
path = "{data}"
image_size = 32

[feature_sets.hog]
hog = {{ orientations = 8, pixels_per_cell = 8, cells_per_block = 2 }}

[candidates.rf_hog]
type = "feature_forest"
params = {{ features = "hog", n_estimators = 60 }}

[candidates.cnn_tiny]
type = "scratch_cnn"
params = {{ blocks = 2, filters = 8, dense_units = 16, dropout = 0.1, epochs = 12, patience = 6, batch_size = 16, learning_rate = 0.005 }}

[ensembles.soft_vote]
type = "soft_voting"
members = "cnn"

[profiles.tiny]
description = "tests"
"""


# a colour-only forest beside TINY_CONFIG's (a part of an ``extra`` that is .format()ted)
COLOUR_FOREST = """
[feature_sets.colour]
color = {{ bins = 8 }}

[candidates.rf_colour]
type = "feature_forest"
params = {{ features = "colour", n_estimators = 30 }}
"""


def write_tiny_config(path: Path, data: Path, extra: str = "") -> Path:
    path.write_text(TINY_CONFIG.format(data=str(data)) + extra)
    return path


def run_error_line(extra: str, data: Path, tmp_path: Path, capsys) -> str:
    """The one ``error:`` line of ``bench run`` on TINY_CONFIG plus ``extra`` (exit code 2)."""
    from bench.commands.cli import main

    cfg = write_tiny_config(tmp_path / "c.toml", data, extra="\n" + extra)
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]
