"""An image file of more pixels than the limit is refused from its header, before a pixel is
decoded, and skipped and listed like any unreadable file: in a dataset, in predict's batches
(and so evaluate and calibrate, which read through them), never a traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import core.images
from bench.config import load_config
from bench.data.datasets import load_dataset, prepare_dataset
from core.errors import BenchError
from core.images import MAX_PIXELS_ENV, Preprocessing, find_images, max_pixels, read_rgb
from tests.conftest import write_toy_folder

LIMIT = 1_000_000


@pytest.fixture
def limited(monkeypatch):
    """The limit at one megapixel, and any decode of an image over it fails the test."""
    monkeypatch.setenv(MAX_PIXELS_ENV, str(LIMIT))
    real = ImageFile.ImageFile.load

    def load(self):
        w, h = self.size
        if w * h > max_pixels():
            pytest.fail(f"a {w}x{h} image was decoded")
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def _big(path: Path, side: int = 5000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), (200, 170, 190)).save(path)  # uniform: a small file
    return path


def test_the_limit_has_a_default_and_one_variable(monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    assert max_pixels() == core.images.MAX_PIXELS == 40_000_000
    monkeypatch.setenv(MAX_PIXELS_ENV, "200_000_000")
    assert max_pixels() == 200_000_000
    for bad in ("lots", "-5", "0", "1.5e8"):
        monkeypatch.setenv(MAX_PIXELS_ENV, bad)
        with pytest.raises(BenchError, match=f"^{MAX_PIXELS_ENV}='{bad}': give the most pixels"):
            max_pixels()


def test_read_rgb_refuses_from_the_header(limited, tmp_path):
    big = _big(tmp_path / "big.png")
    assert big.stat().st_size < 200_000
    with pytest.raises(BenchError) as err:
        read_rgb(big)
    msg = str(err.value)
    assert "\n" not in msg
    for fragment in (
        "too large: 5000x5000 pixels (25.0 megapixels)",
        "limit of 1 megapixels",
        f"set {MAX_PIXELS_ENV} (pixels, now 1000000) higher",
    ):
        assert fragment in msg, msg
    img, mode, size = read_rgb(_big(tmp_path / "ok.png", side=1000))  # at the limit: read
    assert size == "1000x1000" and mode == "RGB"


def test_predict_batches_skip_it_and_read_the_rest(limited, tmp_path):
    folder = tmp_path / "imgs"
    write_toy_folder(folder, n_per_class=2)
    _big(folder / "disc" / "huge.png")
    paths = find_images(folder)
    X, _, ok, errors = Preprocessing(32).load(paths, skip_errors=True)
    assert len(ok) == 6 and X.shape == (6, 32, 32, 3)
    assert [paths[i].name for i, _ in errors] == ["huge.png"]
    assert "huge.png: too large: 5000x5000" in str(errors[0][1])
    got = [
        (s, ok, [str(e) for _, e in errs])
        for s, _, _, ok, errs in Preprocessing(32).batches(paths, batch_size=4)
    ]
    assert sum(len(ok) for _, ok, _ in got) == 6
    assert sum(len(e) for _, _, e in got) == 1
    with pytest.raises(BenchError, match="too large"):  # without skip_errors: one line
        Preprocessing(32).load(paths)


def test_a_dataset_skips_it_with_a_warning_and_a_raised_limit_reads_it(
    limited, tmp_path, monkeypatch, capsys
):
    root = write_toy_folder(tmp_path / "data", n_per_class=4, size=16)
    _big(root / "square" / "huge.png")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\nfolds = 2\n[data]\npath = "{root}"\nimage_size = 16\n[profiles.p]\n')
    ds, _ = prepare_dataset(load_config(cfg, profile="p"), show_progress=False)
    assert len(ds) == 12 and "square/huge.png" not in ds.sources
    (skip,) = ds.skipped
    assert skip["path"] == "square/huge.png" and "too large: 5000x5000" in skip["reason"]
    err = capsys.readouterr().err
    assert "skipped square/huge.png: too large: 5000x5000 pixels" in err
    assert f"{MAX_PIXELS_ENV} (pixels, now 1000000) higher" in err
    # a second load comes from the cache and still lists it; a raised limit decodes it
    again = load_dataset(root, image_size=16, show_progress=False)
    assert again.skipped == ds.skipped and again.content_hash == ds.content_hash
    monkeypatch.setenv(MAX_PIXELS_ENV, "30000000")
    raised = load_dataset(root, image_size=16, show_progress=False)
    assert len(raised) == 13 and not raised.skipped and "square/huge.png" in raised.sources
    assert raised.content_hash != ds.content_hash
    assert np.asarray(raised.images).shape == (13, 16, 16, 3)
    monkeypatch.delenv(MAX_PIXELS_ENV)  # each limit its own key
    assert load_dataset(root, image_size=16, show_progress=False).content_hash not in (
        ds.content_hash,
        raised.content_hash,
    )


def test_a_bad_limit_stops_before_any_file_is_read(tmp_path, monkeypatch):
    root = write_toy_folder(tmp_path / "data", n_per_class=2, size=16)
    monkeypatch.setenv(MAX_PIXELS_ENV, "huge")
    for load in (
        lambda: load_dataset(root, image_size=16, cache_dir=tmp_path / "c", show_progress=False),
        lambda: Preprocessing(16).load(find_images(root), skip_errors=True),
    ):
        with pytest.raises(BenchError, match=f"^{MAX_PIXELS_ENV}='huge'"):
            load()
