"""The lab head of ``bench adapt --n`` (:mod:`core.labhead`): a linear map of the cells'
features beside the predictor's output, fitted on a few labelled cells of a new lab and
shrunk toward the original by inner cross-validation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import check_grad

from core import labhead
from core.errors import BenchError


def _cells(n, k=4, d=20, seed=0, informative_features=True):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = rng.normal(size=(n, d))
    if informative_features:
        x[:, :k] += 2.0 * np.eye(k)[y]
    return y, x


def _balanced_accuracy(y, p):
    pred = p.argmax(1)
    return np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)])


@pytest.mark.parametrize("lam_w", [np.inf, 0.3])
def test_gradient_is_exact(lam_w):
    y, x = _cells(30, k=3, d=5, seed=1)
    logp = np.log(np.random.default_rng(2).dirichlet(np.ones(3), 30))
    f, d = labhead._objective(logp, x, y, 3, 0.1, lam_w)
    theta = np.random.default_rng(3).normal(size=1 + 3 + d * 3) * 0.3
    assert check_grad(lambda t: f(t)[0], lambda t: f(t)[1], theta) < 1e-5


def test_a_lab_the_members_misread_gets_a_head_that_reads_its_cells():
    k = 4
    y, x = _cells(100, k=k)
    rng = np.random.default_rng(4)
    lost = rng.dirichlet(np.ones(k), 100)  # the members' output says nothing here
    fitted = labhead.fit(lost, x, y, seed=0, feature_set={"color": {}})
    assert fitted.record["features_used"] and fitted.head.uses_features
    assert fitted.head.feature_set == {"color": {}}
    yt, xt = _cells(2000, k=k, seed=9)
    pt = rng.dirichlet(np.ones(k), 2000)
    before, after = _balanced_accuracy(yt, pt), _balanced_accuracy(yt, fitted.head.apply(pt, xt))
    assert before < 0.35 and after > 0.55
    # the cross-fitted outputs are outputs of fits without each cell: below the fit's own
    assert fitted.oof.shape == (100, k) and np.allclose(fitted.oof.sum(1), 1)
    assert _balanced_accuracy(y, fitted.oof) < _balanced_accuracy(y, fitted.head.apply(lost, x))


def test_a_lab_whose_cells_say_nothing_new_keeps_the_original_answers():
    k = 4
    y, x = _cells(100, k=k, informative_features=False)
    rng = np.random.default_rng(5)
    good = 0.6 * np.eye(k)[y] + 0.4 * rng.dirichlet(np.ones(k), 100)
    fitted = labhead.fit(good, x, y, seed=0)
    # noise features: no head at all, or one shrunk to nothing
    assert np.abs(fitted.head.weights).max(initial=0.0) < 1e-3
    yt, xt = _cells(1000, k=k, seed=8, informative_features=False)
    pt = 0.6 * np.eye(k)[yt] + 0.4 * rng.dirichlet(np.ones(k), 1000)
    assert np.mean(fitted.head.apply(pt, xt).argmax(1) == pt.argmax(1)) > 0.97


def test_too_few_cells_keep_the_original_output_and_one_rare_cell_does_not():
    y = np.array([0, 1, 2])  # one cell of each class: nothing can be held out
    p = np.full((3, 3), 1 / 3)
    fitted = labhead.fit(p, np.random.default_rng(0).normal(size=(3, 4)), y)
    assert fitted.record["inner_folds"] == 0 and fitted.record["chosen"].startswith("recal")
    assert np.allclose(fitted.head.apply(p), p, atol=1e-3)
    # a class of one cell among many (a rare basophil): still cross-validated, in 2 folds
    y, x = _cells(60, k=3, seed=3)
    y[0] = 3
    lost = np.random.default_rng(1).dirichlet(np.ones(4), 60)
    fitted = labhead.fit(lost, x, y)
    assert fitted.record["inner_folds"] == 2 and fitted.head.uses_features


def test_saved_head_reads_back_as_arrays_and_a_bad_file_is_one_error(tmp_path):
    y, x = _cells(80)
    p = np.random.default_rng(6).dirichlet(np.ones(4), 80)
    head = labhead.fit(p, x, y, feature_set={"hog": {"pixels_per_cell": 8}}).head
    head.save(tmp_path / "h" / "head.npz")
    back = labhead.LabHead.load(tmp_path / "h" / "head.npz")
    assert back.feature_set == head.feature_set
    assert np.allclose(back.apply(p, x), head.apply(p, x))
    with np.load(tmp_path / "h" / "head.npz", allow_pickle=False) as z:
        assert set(z.files) == {*labhead._ARRAYS, "feature_set", "crop"}
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(BenchError, match="bad.npz: unreadable"):
        labhead.LabHead.load(tmp_path / "bad.npz")
    with pytest.raises(BenchError, match="features"):
        head.apply(p)  # a head with a feature map needs the cells' features


def test_missing_feature_values_sit_at_the_lab_mean():
    y, x = _cells(60)
    x[::7, 3] = np.nan
    p = np.random.default_rng(7).dirichlet(np.ones(4), 60)
    fitted = labhead.fit(p, x, y)
    assert np.isfinite(fitted.head.apply(p, x)).all()
    assert np.isfinite(fitted.head.mean).all() or not fitted.head.uses_features


def test_a_bad_head_feature_set_is_one_error_line(toy_folder, tmp_path, capsys):
    from tests.conftest import run_error_line

    line = run_error_line('[predictor]\nadapt_features = "hgo"\n', toy_folder, tmp_path, capsys)
    assert "[predictor] adapt_features 'hgo' is not a [feature_sets.NAME]" in line
    line = run_error_line("[predictor]\nadapt_crop = 0\n", toy_folder, tmp_path, capsys)
    assert "adapt_crop" in line


def test_with_groups_the_sets_outputs_leave_whole_slides_out():
    """Cells of a slide share a look that gives their class away within the slide: the
    outputs the prediction sets are calibrated on must come from fits without the cell's
    slide, or they promise the lab's other slides too much."""
    rng = np.random.default_rng(0)
    slides = np.repeat(np.arange(20), 6)
    y = np.repeat(rng.integers(0, 3, 20), 6)  # one class per slide
    look = rng.normal(size=(20, 10))[slides] * 3  # each slide's own look
    x = look + rng.normal(size=(120, 10)) * 0.1
    p = np.full((120, 3), 1 / 3)
    free = labhead.fit(p, x, y, seed=0)
    grouped = labhead.fit(p, x, y, seed=0, groups=[f"s{s}" for s in slides])
    assert free.record["chosen"] == grouped.record["chosen"]  # the choice is the same
    assert np.allclose(free.head.weights, grouped.head.weights)
    acc = lambda o: np.mean(o.argmax(1) == y)  # noqa: E731
    assert acc(free.oof) > 0.85 and acc(grouped.oof) < 0.6
