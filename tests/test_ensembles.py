"""Ensembles on synthetic probability matrices: voting, greedy selection, stacking."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.errors import BenchError
from ensembles.base import cross_val_combine
from ensembles.overlay import FIG_SIZE_PX, gradcam_names, write_gradcam_png
from ensembles.selection import greedy_selection
from ensembles.stacking import C_GRID, META_LEARNERS, Stacking
from ensembles.voting import SoftVoting

K = 4


def noisy_member(y, rng, acc, k=K, conf=0.8):
    """Probabilities that put ``conf`` on the true class for a share ``acc`` of rows, else
    on a random wrong class."""
    n = len(y)
    right = rng.random(n) < acc
    pred = np.where(right, y, (y + rng.integers(1, k, n)) % k)
    p = np.full((n, k), (1 - conf) / (k - 1))
    p[np.arange(n), pred] = conf
    return p


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, K, 400)
    folds = np.arange(400) % 5
    return y, folds, rng


def test_soft_voting_equal_and_fixed_weights_are_weighted_means():
    a = np.array([[0.6, 0.4], [0.2, 0.8]])
    b = np.array([[0.0, 1.0], [1.0, 0.0]])
    y = np.array([0, 1])
    eq = SoftVoting().fit([a, b], y)
    np.testing.assert_allclose(eq.combine([a, b]), [[0.3, 0.7], [0.6, 0.4]])
    fixed = SoftVoting(weights=[3, 1]).fit([a, b], y)
    assert fixed.weights_ == [0.75, 0.25]
    np.testing.assert_allclose(fixed.combine([a, b]), 0.75 * a + 0.25 * b)
    with pytest.raises(ValueError, match="fitted for 2 members"):
        fixed.combine([a])
    with pytest.raises(ValueError, match="weights must be"):
        SoftVoting(weights="best").fit([a, b], y)


def test_optimized_weights_favour_the_better_member(data):
    y, _, rng = data
    good, bad = noisy_member(y, rng, 0.9), noisy_member(y, rng, 0.3)
    w = SoftVoting(weights="optimized").fit([bad, good], y).weights_
    assert w[1] > 0.8 and abs(sum(w) - 1) < 1e-9


def test_greedy_selection_with_replacement(data):
    y, _, rng = data
    a, b = noisy_member(y, rng, 0.85), noisy_member(y, rng, 0.85)
    useless = np.full((len(y), K), 1.0 / K)
    w = greedy_selection([useless, a, b], y, rounds=20)
    assert w[0] == 0 and w[1] > 0 and w[2] > 0
    # weights are selection counts over the best prefix of at most rounds + 1 picks
    assert any(np.allclose(w * n, np.round(w * n)) for n in range(1, 22))
    assert greedy_selection([a, b], y, rounds=0).tolist() in ([1.0, 0.0], [0.0, 1.0])
    # identical members: the first is picked every time, the copy never
    assert greedy_selection([a, a.copy()], y, rounds=5).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="selection metric"):
        greedy_selection([a], y, metric="f1")


def test_greedy_soft_voting_combines_by_counts_and_drops_unused(data):
    y, _, rng = data
    a, b = noisy_member(y, rng, 0.8), noisy_member(y, rng, 0.8)
    useless = np.full((len(y), K), 1.0 / K)
    ens = SoftVoting(weights="greedy", rounds=10).fit([a, useless, b], y)
    w = np.array(ens.weights_)
    np.testing.assert_allclose(ens.combine([a, useless, b]), w[0] * a + w[1] * useless + w[2] * b)
    assert ens.member_weights()[1] == 0
    assert ens.drop_unused() == [0, 2]
    assert ens.n_members_ == 2
    np.testing.assert_allclose(ens.combine([a, b]), w[0] * a + w[2] * b)


def test_greedy_weights_chosen_inside_training_split(data):
    """cross_val_combine's weights for fold k come from the other folds only: changing
    fold k's labels changes nothing in fold k's combination."""
    y, folds, rng = data
    probas = [noisy_member(y, rng, 0.7), noisy_member(y, rng, 0.6), np.full((len(y), K), 0.25)]
    ens = SoftVoting(weights="greedy", rounds=15)
    base = cross_val_combine(ens, probas, y, folds)
    y2 = y.copy()
    y2[folds == 0] = (y2[folds == 0] + 1) % K
    again = cross_val_combine(ens, probas, y2, folds)
    np.testing.assert_array_equal(base[folds == 0], again[folds == 0])
    assert not np.array_equal(base[folds != 0], again[folds != 0])


def test_stacking_learns_what_voting_cannot(data):
    """A member that always names the next class: voting follows it, stacking decodes it."""
    y, folds, rng = data
    shifted = noisy_member((y + 1) % K, rng, 0.95)
    weak = noisy_member(y, rng, 0.4)
    vote = cross_val_combine(SoftVoting(), [shifted, weak], y, folds)
    stack = cross_val_combine(Stacking(), [shifted, weak], y, folds)
    assert (vote.argmax(1) == y).mean() < 0.5
    assert (stack.argmax(1) == y).mean() > 0.9
    np.testing.assert_allclose(stack.sum(axis=1), 1.0)


def test_stacking_equals_logistic_regression_on_log_probabilities(data):
    from sklearn.linear_model import LogisticRegression

    y, _, rng = data
    probas = [noisy_member(y, rng, 0.7), noisy_member(y, rng, 0.6)]
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def reference(X, C=1.0):  # scaled inputs, then logistic regression
        lr = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
        return lr.fit(X, y).predict_proba(X)

    X = np.log(np.clip(np.concatenate(probas, axis=1), 1e-6, 1))
    np.testing.assert_allclose(
        Stacking(C=0.5, inputs="log_proba").fit(probas, y).combine(probas),
        reference(X, 0.5),
        atol=1e-10,
    )
    Xp = np.concatenate(probas, axis=1)
    np.testing.assert_allclose(
        Stacking(C=1.0).fit(probas, y).combine(probas), reference(Xp), atol=1e-10
    )


def test_stacking_has_no_fold_leakage(data):
    """The meta-learner for fold k never sees fold k's rows: fold k's stacked
    probabilities equal a meta-learner fitted by hand on the other folds, and do not move
    when fold k's labels are changed."""
    y, folds, rng = data
    probas = [noisy_member(y, rng, 0.7), noisy_member(y, rng, 0.65)]
    oof = cross_val_combine(Stacking(), probas, y, folds)
    for k in range(5):
        tr, te = folds != k, folds == k
        meta = Stacking().fit([p[tr] for p in probas], y[tr], groups=folds[tr])
        assert meta.C_ in C_GRID
        np.testing.assert_array_equal(oof[te], meta.combine([p[te] for p in probas]))
    y2 = y.copy()
    y2[folds == 3] = rng.permutation(y2[folds == 3])
    oof2 = cross_val_combine(Stacking(), probas, y2, folds)
    np.testing.assert_array_equal(oof[folds == 3], oof2[folds == 3])
    # ... whereas fitting on every row (the leak) would change them
    leaky = [Stacking().fit(probas, lab).combine(probas)[folds == 3] for lab in (y, y2)]
    assert not np.allclose(*leaky)


@pytest.mark.parametrize("meta", sorted(META_LEARNERS))
def test_stacking_state_is_json_and_round_trips(data, meta):
    y, _, rng = data
    probas = [noisy_member(y, rng, 0.7), noisy_member(y, rng, 0.6)]
    ens = Stacking(meta=meta).fit(probas, y)
    state = json.loads(json.dumps(ens.get_state()))
    back = Stacking(**ens.get_params()).set_state(state)
    np.testing.assert_array_equal(back.combine(probas), ens.combine(probas))
    assert (ens.combine(probas).argmax(1) == y).mean() > 0.5
    assert ens.member_weights() is None  # Grad-CAM: equal weights


def test_stacking_chooses_C_leaving_one_fold_out(data):
    """C="auto" takes the grid value with the best leave-one-fold-out log loss: with a
    member whose confidence means different things in different folds, strong
    regularisation wins; with a reliable member, weak regularisation does."""
    y, folds, _ = data
    rng = np.random.default_rng(2)
    good = [noisy_member(y, rng, 0.9), noisy_member(y, rng, 0.8)]
    weak = Stacking().fit(good, y, groups=folds)
    assert weak.C_ >= 0.3
    shifted = np.where(
        (folds == 0)[:, None], noisy_member((y + 1) % K, rng, 0.9), noisy_member(y, rng, 0.9)
    )
    strong = Stacking().fit([shifted, noisy_member(y, rng, 0.5)], y, groups=folds)
    assert strong.C_ < weak.C_
    assert Stacking().fit(good, y).C_ in C_GRID  # no groups: stratified inner folds
    assert Stacking(C=2.0).fit(good, y, groups=folds).C_ == 2.0


def test_stacking_keeps_every_class_column():
    rng = np.random.default_rng(1)
    y = np.array([0, 1, 2] * 20)
    probas = [noisy_member(y, rng, 0.8, k=4)]
    out = Stacking().fit(probas, y).combine(probas)
    assert out.shape == (60, 4) and np.all(out[:, 3] == 0)


def test_stacking_rejects_bad_settings(data):
    y, _, rng = data
    probas = [noisy_member(y, rng, 0.7)]
    for kwargs, msg in [
        ({"meta": "svm"}, "meta must be"),
        ({"inputs": "logits"}, "inputs"),
        ({"C": 0}, "C must be"),
    ]:
        with pytest.raises(ValueError, match=msg):
            Stacking(**kwargs).fit(probas, y)
    with pytest.raises(ValueError, match="lacks"):
        Stacking().set_state({"n_members": 1, "n_classes": K, "meta": {}})
    with pytest.raises(ValueError, match="dtype"):
        bad = Stacking().fit(probas, y).get_state()
        bad["meta"]["coef_"]["dtype"] = "|O"
        Stacking().set_state(bad)


def test_runner_reports_bad_ensemble_settings_in_one_line(data):
    from bench.config import EnsembleEntry
    from ensembles.build import build_ensemble as _build_ensemble, fit_ensemble as _fit_ensemble

    y, folds, rng = data
    with pytest.raises(BenchError, match=r"\[ensembles.st\]: bad settings"):
        _build_ensemble(EnsembleEntry(type="stacking", members="cnn", metaa="x"), "st")
    ens = _build_ensemble(EnsembleEntry(type="stacking", meta="svm"), "st")
    with pytest.raises(BenchError, match=r"\[ensembles.st\]: stacking meta must be"):
        _fit_ensemble(ens, [[noisy_member(y, rng, 0.7)]], y, "st", folds)


def test_gradcam_names_are_unique_and_readable(tmp_path):
    for rel in ["a/x.jpg", "b/x.jpg", "a/x.png", "a__b/c.jpg", "a/b__c.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).touch()
    paths = [tmp_path / r for r in ["a/x.jpg", "b/x.jpg", "a/x.png", "a__b/c.jpg", "a/b__c.jpg"]]
    names = gradcam_names(paths, tmp_path)
    assert names[:4] == ["a__x.jpg.png", "b__x.jpg.png", "a__x.png.png", "a__b__c.jpg.png"]
    assert names[4].startswith("a__b__c.jpg-") and names[4].endswith(".png")
    assert len(set(names)) == 5
    assert gradcam_names([paths[0]], paths[0]) == ["x.jpg.png"]  # a single file: its name


def test_gradcam_png_has_the_fixed_size(tmp_path):
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 256, (363, 360, 3), dtype=np.uint8)
    cam = np.zeros((64, 64), np.float32)
    cam[10:20, 30:40] = 1
    out = write_gradcam_png(
        tmp_path / "x.png", img, cam, np.array([0.1, 0.6, 0.3]), ["a", "b", "c"], title="x"
    )
    with Image.open(out) as im:
        assert im.size == FIG_SIZE_PX and im.format == "PNG"
