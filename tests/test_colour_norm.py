"""``[data] colour_norm``: per-image colour normalisation for every candidate kind, in
training and in the predictor alike (``core.colour.image_colour``, the ``Preprocessing``
record)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2lab

from bench.commands.cli import main
from core.colour import REINHARD_TARGET, RGB_TARGET, image_colour
from core.errors import BenchError
from core.images import Preprocessing
from ensembles.predictor import load_predictor
from tests.conftest import COLOUR_FOREST, toy_arrays, write_tiny_config


def _cast(images: np.ndarray) -> np.ndarray:
    """Another camera's white balance and a paler stain: each channel scaled and offset."""
    return np.clip(images * np.array([0.8, 0.9, 0.7]) + [30, 10, 50], 0, 255).astype(np.uint8)


def test_each_image_is_mapped_onto_the_target():
    images, _ = toy_arrays(4, 32, seed=3)
    lab = rgb2lab(image_colour(images, "reinhard"))
    assert np.allclose(lab.mean(axis=(1, 2)), REINHARD_TARGET["mean"], atol=2.5)
    rgb = image_colour(images, "rgb").astype(float)
    assert np.allclose(rgb.mean(axis=(1, 2)), RGB_TARGET["mean"], atol=3)
    # a per-channel cast is undone (up to rounding and clipping)
    same = image_colour(_cast(images), "rgb").astype(int) - image_colour(images, "rgb")
    assert np.mean(np.abs(same)) < 2.0
    assert image_colour(images, "none") is images
    assert image_colour(images[0], "rgb").shape == images[0].shape
    with pytest.raises(ValueError, match="unknown colour normalisation"):
        image_colour(images, "grey")


def test_the_preprocessing_record_carries_it():
    p = Preprocessing(32, colour_norm="reinhard")
    assert Preprocessing.from_dict(p.to_dict()) == p
    assert "colour_norm" not in Preprocessing(32).to_dict()  # older records read the same
    with pytest.raises(BenchError, match="colour_norm must be one of"):
        Preprocessing(32, colour_norm="grey")
    img = toy_arrays(1, 48, seed=1)[0][0]
    assert np.array_equal(p.apply(img), image_colour(Preprocessing(32).apply(img), "reinhard"))


def _predictor(tmp_path, toy_folder, norm: str):
    extra = (
        COLOUR_FOREST.format()
        + f'\n[report]\nenabled = false\n[profiles.tiny.data]\ncolour_norm = "{norm}"\n'
    )
    cfg = write_tiny_config(tmp_path / f"{norm}.toml", toy_folder, extra)
    out = tmp_path / norm
    assert main(["run", "--config", str(cfg), "--only", "rf_colour", "--out", str(out)]) == 0
    return load_predictor(out / "predictor")


def test_a_normalised_predictor_shrugs_off_a_camera_cast(tmp_path, toy_folder):
    images, _ = toy_arrays(10, 32, seed=17)
    plain = _predictor(tmp_path, toy_folder, "none")
    norm = _predictor(tmp_path, toy_folder, "rgb")
    assert norm.preprocessing.colour_norm == "rgb" and plain.preprocessing.colour_norm == "none"

    def moved(pred):
        a, b = pred.predict_proba(images), pred.predict_proba(_cast(images))
        return float(np.abs(a - b).mean())

    # the colour-only forest reads the cast unless every image is normalised first
    assert moved(norm) < 0.05 < moved(plain)
