"""The shift score (are these images like the training images?) and test-time views."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from bench.commands.cli import main
from core.shift import ShiftReference
from tests.conftest import toy_arrays, write_tiny_config


def _pinker(X: np.ndarray) -> np.ndarray:
    """Another lab's stain: paler and pinker."""
    x = X.astype(np.float64)
    x = 0.6 * x + 0.4 * 255
    x[..., 1] *= 0.85
    return np.clip(x, 0, 255).astype(np.uint8)


def test_shift_score_is_typical_in_distribution_and_high_outside():
    X, _ = toy_arrays(60, 32, seed=0)
    ref = ShiftReference.fit(X)
    same, _ = toy_arrays(30, 32, seed=1)
    s_in, s_out = ref.score(same), ref.score(_pinker(same))
    assert 0.2 < np.median(s_in) < 0.8
    assert np.median(s_out) > 0.99
    assert not ref.batch_summary(s_in)["flagged"] and ref.batch_summary(s_out)["flagged"]
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    assert roc_auc_score(y, np.r_[s_in, s_out]) > 0.95
    again = ShiftReference.from_dict(json.loads(json.dumps(ref.to_dict())))
    np.testing.assert_allclose(again.score(same), s_in, atol=0.01)  # 1001 stored quantiles


def test_shift_reference_needs_no_labels_and_is_seeded():
    X, _ = toy_arrays(80, 24, seed=2)
    a = ShiftReference.fit(X, max_images=100, seed=3)
    b = ShiftReference.fit(X, max_images=100, seed=3)
    np.testing.assert_array_equal(a.mean, b.mean)


@pytest.fixture(scope="module")
def rf_run(tmp_path_factory, toy_folder):
    from bench.run.runner import run_from_args

    root = tmp_path_factory.mktemp("shift")
    cfg = write_tiny_config(root / "c.toml", toy_folder, extra='\n[predictor]\ntta = "flips"\n')
    board, out = run_from_args(
        str(cfg), out=str(root / "run"), only=["rf_hog"], show_progress=False
    )
    return out


def test_tta_averages_the_flipped_views(rf_run, tmp_path):
    from ensembles import load_predictor

    pred = load_predictor(rf_run / "predictor")
    assert pred.tta == "flips" and pred.record.tta == "flips"
    X, _ = toy_arrays(4, 32, seed=5)
    views = [X, X[:, :, ::-1], X[:, ::-1], X[:, ::-1, ::-1]]
    pred.tta = "none"
    expected = np.mean([pred.predict_proba(np.ascontiguousarray(v)) for v in views], axis=0)
    single = pred.predict_proba(X)
    pred.tta = "flips"
    got = pred.predict_proba(X)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert not np.allclose(got, single)  # the views do change the forest's output


def test_predict_reports_shift_scores_and_warns_on_other_stains(rf_run, tmp_path, capsys):
    X, _ = toy_arrays(6, 32, seed=7)
    for name, arr in (("same", X), ("pink", _pinker(X))):
        d = tmp_path / name
        d.mkdir()
        for i, im in enumerate(arr):
            Image.fromarray(im).save(d / f"{i}.png")
    out = tmp_path / "same.csv"
    assert (
        main(
            [
                "predict",
                "--model",
                str(rf_run / "predictor"),
                "--img_path",
                str(tmp_path / "same"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "unlike the training images" not in capsys.readouterr().err
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 18 and all(0 <= float(r["shift_score"]) <= 1 for r in rows)
    out2 = tmp_path / "pink.csv"
    assert (
        main(
            [
                "predict",
                "--model",
                str(rf_run / "predictor"),
                "--img_path",
                str(tmp_path / "pink"),
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "unlike the training images" in err
    assert np.median([float(r["shift_score"]) for r in csv.DictReader(out2.open())]) > 0.99
