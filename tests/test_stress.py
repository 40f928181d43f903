"""The stress test: fold models scored under simulated lab shifts, ensembles fitted on the
shifted rows, and the predictor chosen by how it holds up."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.errors import BenchError
from core.stress import COLOUR_SHIFTS, SHIFTS, simulate
from ensembles.base import cross_val_combine, cross_val_combine_sets
from ensembles.build import choose_entry
from ensembles.stacking import Stacking
from tests.conftest import COLOUR_FOREST, run_error_line, toy_arrays, write_tiny_config


# -- the shifts ---------------------------------------------------------------------------


@pytest.mark.parametrize("shift", COLOUR_SHIFTS)
def test_a_shift_is_seeded_per_image_and_changes_colour_not_shape(shift):
    X, _ = toy_arrays(4, 32, seed=3)
    rows = np.arange(100, 100 + len(X))
    out = simulate(X, shift, rows, seed=7)
    assert out.shape == X.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - X.astype(int)).mean(axis=(1, 2, 3))
    assert (diff > 1.0).all()  # every image re-coloured ...
    assert len(np.unique(np.round(diff, 3))) > len(X) // 2  # ... each its own way
    # the same image and row give the same result in any batch, order or process
    again = simulate(X[::-1][:5], shift, rows[::-1][:5], seed=7)
    np.testing.assert_array_equal(again, out[::-1][:5])
    assert not np.array_equal(simulate(X[:3], shift, rows[:3], seed=8), out[:3])
    # a shift of colour, not of the picture: the grey-level layout stays close
    g0, g1 = X.mean(axis=-1).reshape(len(X), -1), out.mean(axis=-1).reshape(len(X), -1)
    assert min(np.corrcoef(a, b)[0, 1] for a, b in zip(g0, g1)) > 0.8


def test_camera_shift_changes_magnification_and_focus_not_colour():
    """A dark disk of radius 10 on a light background: under "camera" its radius is scaled
    by each image's own factor in [0.8, 1.25] about the centre, its edge is softened, and
    the colours of the disk and of the background stay what they were."""
    assert set(SHIFTS) == {*COLOUR_SHIFTS, "camera", "scale"}
    n, size = 40, 64
    yy, xx = np.mgrid[:size, :size]
    disk = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2) <= 10
    X = np.where(
        disk[None, ..., None],
        np.array([60, 30, 120], np.uint8),
        np.array([240, 220, 200], np.uint8),
    ).astype(np.uint8)
    X = np.repeat(X, n, axis=0)
    rows = np.arange(n)
    out = simulate(X, "camera", rows, seed=3)
    assert out.shape == X.shape and out.dtype == np.uint8
    dark = out.astype(int).sum(axis=-1) < (60 + 30 + 120 + 240 + 220 + 200) / 2
    ratio = np.sqrt(dark.sum(axis=(1, 2)) / disk.sum())
    assert ((ratio > 0.76) & (ratio < 1.3)).all()
    assert (ratio < 0.95).any() and (ratio > 1.05).any()  # zoomed out and in
    np.testing.assert_array_equal(out[:, 0, 0], X[:, 0, 0])  # background colour kept
    np.testing.assert_array_equal(out[:, 32, 32], X[:, 32, 32])  # the disk's colour kept
    grey = out.astype(float).mean(axis=-1)
    edges = (grey > 90) & (grey < 210)  # between the two levels: a softened edge
    assert edges.sum(axis=(1, 2)).max() > 2 * edges.sum(axis=(1, 2)).min()
    np.testing.assert_array_equal(simulate(X[5:9], "camera", rows[5:9], seed=3), out[5:9])
    assert not np.array_equal(simulate(X[:4], "camera", rows[:4], seed=4), out[:4])


def test_scale_shift_magnifies_the_cell_as_a_tight_crop_would():
    """Under "scale" a centred disk of radius 10 grows by each image's factor in [1.4, 2.2]
    (area by its square), never shrinks, and keeps its colours."""
    n, size = 30, 64
    yy, xx = np.mgrid[:size, :size]
    disk = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2) <= 10
    X = np.repeat(
        np.where(
            disk[None, ..., None],
            np.array([60, 30, 120], np.uint8),
            np.array([240, 220, 200], np.uint8),
        ).astype(np.uint8),
        n,
        axis=0,
    )
    out = simulate(X, "scale", np.arange(n), seed=1)
    dark = out.astype(int).sum(axis=-1) < (60 + 30 + 120 + 240 + 220 + 200) / 2
    ratio = np.sqrt(dark.sum(axis=(1, 2)) / disk.sum())
    assert ((ratio > 1.35) & (ratio < 2.3)).all() and ratio.max() - ratio.min() > 0.3
    np.testing.assert_array_equal(out[:, 32, 32], X[:, 32, 32])


def test_bad_shift_input_is_an_error():
    X, _ = toy_arrays(1, 16)
    with pytest.raises(ValueError, match="unknown simulated shift 'blur'"):
        simulate(X, "blur", [0, 1, 2])
    with pytest.raises(ValueError, match="rows for"):
        simulate(X, "stain", [0])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        simulate(X[..., 0], "stain", [0, 1, 2])


# -- ensembles fitted under shift --------------------------------------------------------


def _members(seed=0, n=600):
    """A member that is right on clean rows and random under shift, and one that is right
    on 80 % of the rows either way."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    folds = np.arange(n) % 4

    def onehot(labels, conf):
        p = np.full((n, 3), (1 - conf) / 2)
        p[np.arange(n), labels] = conf
        return p

    right = rng.random(n) < 0.8
    robust = onehot(np.where(right, y, (y + 1) % 3), 0.7)
    fragile_clean = onehot(y, 0.95)
    fragile_shift = onehot(rng.integers(0, 3, n), 0.95)
    return y, folds, [fragile_clean, robust], [fragile_shift, robust]


def test_an_ensemble_fitted_under_shift_trusts_the_member_that_holds_up():
    y, folds, clean, shifted = _members()
    plain = cross_val_combine_sets(Stacking(C=1.0), [clean, shifted], y, folds, fit_sets=1)
    stressed = cross_val_combine_sets(Stacking(C=1.0), [clean, shifted], y, folds, fit_sets=2)
    acc = lambda p: float(np.mean(p.argmax(1) == y))  # noqa: E731
    # the plain stack follows the fragile member and collapses under the shift ...
    assert acc(plain[0]) > 0.9 and acc(plain[1]) < 0.5
    # ... the one fitted under shift keeps most of the robust member's accuracy there and
    # still uses the fragile member on clean rows
    assert acc(stressed[1]) > 0.75 and acc(stressed[0]) > 0.8
    # the clean rows alone are the usual cross-validated combination
    np.testing.assert_allclose(plain[0], cross_val_combine(Stacking(C=1.0), clean, y, folds))


def test_robust_choice_takes_the_best_under_shift_within_the_tolerance():
    # sorted by accuracy, as the run's board; "m" is a colour-only shortcut
    board = pd.DataFrame(
        {
            "candidate": ["m", "a", "b", "c"],
            "kind": ["baseline"] + ["ensemble"] * 3,
            "accuracy": [0.99, 0.98, 0.977, 0.96],
            "stress_accuracy": [0.99, 0.80, 0.90, 0.95],
        }
    )
    assert choose_entry(board, "best")["candidate"] == "m"  # the best row, any kind
    assert choose_entry(board, "best", exclude=["m"])["candidate"] == "a"
    assert choose_entry(board, "robust", "accuracy", 0.005, ["m"])["candidate"] == "b"
    assert choose_entry(board, "robust", "accuracy", 0.05, ["m"])["candidate"] == "c"
    assert choose_entry(board, "robust", "accuracy", 0.0, ["m"])["candidate"] == "a"
    # the shortcut is never saved, even when it is also the most robust
    assert choose_entry(board, "robust", "accuracy", 0.05)["candidate"] == "m"
    assert choose_entry(board, "robust", "accuracy", 0.05, ["m"])["candidate"] != "m"
    # a lower-is-better metric: within the tolerance above the best
    lb = board.assign(log_loss=[0.05, 0.10, 0.12, 0.30], stress_log_loss=[0.1, 0.5, 0.3, 0.1])
    lb = lb.sort_values("log_loss")
    assert choose_entry(lb, "robust", "log_loss", 0.05, ["m"])["candidate"] == "b"
    with pytest.raises(BenchError, match="needs \\[stress\\] shifts"):
        choose_entry(board.drop(columns="stress_accuracy"), "robust")
    # every row a shortcut: the best of them (the run warns)
    assert choose_entry(board[board["candidate"] == "m"], "best", exclude=["m"])["candidate"] == "m"


# -- in a run -------------------------------------------------------------------------------

STRESS = (
    COLOUR_FOREST
    + """
[stress]
shifts = ["stain"]

[ensembles.stack_plain]
type = "stacking"
members = "all"
C = 1.0

[ensembles.stack_stress]
type = "stacking"
members = "all"
C = 1.0
stress = true

[predictor]
ensemble = "robust"
robust_tolerance = {tol}
"""
)


@pytest.fixture(scope="module")
def stress_run(tmp_path_factory, toy_folder):
    from bench.run.runner import run_from_args

    root = tmp_path_factory.mktemp("stress")
    cfg = write_tiny_config(root / "c.toml", toy_folder, extra=STRESS.format(tol=1.0))
    board, out = run_from_args(
        str(cfg), out=str(root / "run"), only=["rf_hog", "rf_colour"], show_progress=False
    )
    return cfg, out


def test_a_run_scores_every_entry_under_each_shift(stress_run):
    from bench.run.rundir import RunDir
    from core.metrics import fold_metrics

    _, out = stress_run
    run = RunDir(out)
    board = pd.read_csv(out / "leaderboard.csv").set_index("candidate")
    names = ["rf_hog", "rf_colour", "soft_vote", "stack_plain", "stack_stress"]
    assert set(board.index) == set(names) - {"soft_vote"}  # soft_vote: no CNN member
    y = run.labels
    for name in board.index:
        p = np.load(out / "oof" / "stress" / "stain" / f"{name}.npy").astype(np.float64)
        assert p.shape == (len(y), 3)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-4)
        want = np.mean([fold_metrics(y[t], p[t])["accuracy"] for _, _, t in run.folds])
        assert board.loc[name, "stress_stain_accuracy"] == pytest.approx(want, abs=1e-6)
        assert board.loc[name, "stress_accuracy"] == board.loc[name, "stress_stain_accuracy"]
    # the stressed ensemble: fold k fitted on the other folds' clean and shifted rows
    members = [run.read_oof(m) for m in ("rf_hog", "rf_colour")]
    shifted = [
        np.load(out / "oof" / "stress" / "stain" / f"{m}.npy").astype(np.float64)
        for m in ("rf_hog", "rf_colour")
    ]
    want = cross_val_combine_sets(
        Stacking(C=1.0), [members, shifted], y, run.folds.folds, fit_sets=2
    )
    np.testing.assert_allclose(run.read_oof("stack_stress"), want[0], atol=1e-5)
    np.testing.assert_allclose(
        np.load(out / "oof" / "stress" / "stain" / "stack_stress.npy"), want[1], atol=1e-5
    )
    # the predictor: the best ensemble under shift (tolerance 1: every ensemble qualifies)
    ens = board[board["kind"] == "ensemble"]
    assert run.read_state()["predictor"] == ens["stress_accuracy"].idxmax()
    md = (out / "leaderboard.md").read_text()
    assert "accuracy under shift" in md


def test_a_resumed_run_scores_missing_shifts_from_the_saved_models(stress_run):
    from bench.run.runner import run_from_args

    cfg, out = stress_run
    unit = out / "units" / "rf_colour" / "fold1" / "stress_stain.npy"
    before = np.load(unit)
    board_before = pd.read_csv(out / "leaderboard.csv")
    unit.unlink()
    run_from_args(str(cfg), out=str(out), only=["rf_hog", "rf_colour"], show_progress=False)
    np.testing.assert_array_equal(np.load(unit), before)  # the same shift of the same images
    board = pd.read_csv(out / "leaderboard.csv")
    pd.testing.assert_series_equal(board["stress_accuracy"], board_before["stress_accuracy"])


@pytest.mark.parametrize(
    "extra,fragment",
    [
        ('[ensembles.s]\ntype = "stacking"\nstress = true\n', "[ensembles.s] stress = true needs"),
        ('[predictor]\nensemble = "robust"\n', "ensemble = 'robust' needs [stress] shifts"),
        ('[stress]\nshifts = ["blur"]\n', "[stress] shifts"),
        ('[stress]\nshift = ["stain"]\n', "did you mean 'shifts'"),
    ],
)
def test_bad_stress_settings_are_one_line(extra, fragment, toy_folder, tmp_path, capsys):
    assert fragment in run_error_line(extra, toy_folder, tmp_path, capsys)


def test_the_report_shows_each_entry_under_shift(stress_run):
    from bench.run.leaderboard import fmt

    _, out = stress_run
    html = (out / "report" / "index.html").read_text()
    board = pd.read_csv(out / "leaderboard.csv").set_index("candidate")
    assert "accuracy under shift" in html and "simulated lab shift (stain" in html
    for name in board.index:
        assert f">{fmt(board.loc[name, 'stress_accuracy'])}</td>" in html
    md = (out / "report" / "leaderboard.md").read_text()
    assert "accuracy under shift" in md


def test_the_external_section_correlates_the_stress_test_with_the_external_ranking():
    from bench.report.tables import external_agreement

    table = pd.DataFrame(
        {
            "candidate": list("abcd"),
            "in_domain_balanced_accuracy": [0.99, 0.98, 0.97, 0.96],
            "external_balanced_accuracy": [0.40, 0.50, 0.60, 0.70],
            "under_shift": [0.60, 0.70, 0.80, 0.90],
        }
    )
    a = external_agreement(table)
    assert a["rho"] == pytest.approx(-1.0) and a["rho_shift"] == pytest.approx(1.0)
    assert a["n_shift"] == 4
    none = external_agreement(table.assign(under_shift=np.nan))
    assert np.isnan(none["rho_shift"]) and none["n_shift"] == 0
