"""The cell-type stage's parts (ensembles.celltypes) and the bounded referral band
(core.conformal.refer_band): numbers against scikit-learn and against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from core.conformal import refer_band, referral_curve
from ensembles.bags import TypeModelAggregator, bag_score
from ensembles.celltypes import (
    LinearModel,
    one_hot_types,
    type_name,
    type_profile,
    typed_cells,
)
from ensembles.record import BagTask


@pytest.mark.parametrize(
    "clf,k",
    [
        (LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"), 4),
        (LogisticRegression(C=0.5, max_iter=2000), 2),
        (LogisticRegression(C=0.5, max_iter=2000), 3),
    ],
)
def test_linear_model_answers_as_the_fitted_pipeline(tmp_path, clf, k):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 6)) + np.repeat(np.arange(k), 200 // k + 1)[:200, None] * 0.7
    X[rng.random(X.shape) < 0.05] = np.nan
    y = np.repeat(np.arange(k), 200 // k + 1)[:200]
    pipe = make_pipeline(
        SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(), clf
    ).fit(X, y)
    model = LinearModel.from_pipeline(pipe, k)
    (tmp_path / "m.npz").write_bytes(model.to_bytes())
    back = LinearModel.from_file(tmp_path / "m.npz")
    assert np.allclose(back.proba(X), pipe.predict_proba(X), atol=1e-9)


def test_typed_cells_and_the_type_profile():
    assert list(typed_cells(np.array([0.1, 0.7, 0.5, 0.2]))) == [1, 2]
    assert list(typed_cells(np.array([0.1, 0.2]))) == [0, 1]  # none typed: every cell
    T = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    p = np.array([0.9, 0.5, 0.1])
    prof = type_profile(T, p)
    assert np.allclose(prof[:2], [0.5, 0.5])  # composition
    assert np.allclose(prof[2:4], [(0.9 + 0.25) / 1.5, (0.25 + 0.1) / 1.5])  # per-type means
    assert prof[4] == pytest.approx(0.5)
    absent = type_profile(np.array([[1.0, 0.0]]), np.array([0.8]))
    assert np.allclose(absent, [1.0, 0.0, 0.8, 0.8, 0.8])  # an absent type: the bag's mean


def test_given_types_are_read_as_the_analyser_names_them():
    assert type_name("Blast, no lineage spec") == "blast_no_lineage_spec"
    assert type_name(" Segmented neutrophils ") == "segmented_neutrophils"
    types = ["blast_no_lineage_spec", "lymphocyte", "promyelocyte"]
    oh = one_hot_types(["Promyelocyte", "Lymphocyte", "", "Smudge"], types)
    assert oh.tolist() == [[0, 0, 1], [0, 1, 0], [0, 0, 0], [0, 0, 0]]


def _brute(scores, pos, t, rate):
    """Every band from the threshold to the i-th score below and the j-th above."""
    wrong = (scores >= t) != pos
    below = np.sort(scores[scores < t])[::-1]
    above = np.sort(scores[scores >= t])
    best = None
    for i, j in itertools.product(range(len(below) + 1), range(len(above) + 1)):
        if i + j > int(np.floor(rate * len(scores) + 1e-9)):
            continue
        lo = below[i - 1] if i else t
        hi = above[j - 1] if j else t
        inside = (scores >= lo) & (scores <= hi) if (i or j) else np.zeros(len(scores), bool)
        key = (int((wrong & ~inside).sum()), i + j)
        best = key if best is None or key < best else best
    return best


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_refer_band_is_bounded_and_leaves_the_fewest_errors_outside(rate):
    rng = np.random.default_rng(3)
    for _ in range(5):
        s = rng.random(30)
        pos = rng.random(30) < s
        band = refer_band(s, pos, 0.5, rate)
        assert band["n_inside"] <= np.floor(rate * 30 + 1e-9)
        assert (band["n_wrong_outside"], band["n_inside"]) == _brute(s, pos, 0.5, rate)
        if band["n_inside"]:
            inside = (s >= band["lo"]) & (s <= band["hi"])
            assert inside.sum() == band["n_inside"] and band["lo"] <= 0.5 <= band["hi"] + 1e-12
    # the whole band spans every misclassified patient and the threshold
    s = np.array([0.1, 0.3, 0.45, 0.55, 0.8, 0.9])
    pos = np.array([False, True, False, False, True, True])
    full = refer_band(s, pos, 0.5, 1.0)
    assert (full["lo"], full["hi"], full["n_wrong_outside"]) == (0.3, 0.55, 0)


def test_referral_curve_counts_the_called_patients():
    s = np.array([0.1, 0.4, 0.6, 0.9])
    pos = np.array([False, True, False, True])
    curve = referral_curve(
        s, pos, np.full(4, 0.5), {0.0: (np.inf, -np.inf), 0.5: (np.full(4, 0.4), np.full(4, 0.6))}
    )
    assert curve[0]["referred"] == 0 and curve[0]["accuracy_called"] == 0.5
    assert curve[1]["referred"] == 0.5 and curve[1]["accuracy_called"] == 1.0
    assert curve[1]["sensitivity_called"] == 1.0 and curve[1]["n_called"] == 2


def test_bag_score_over_typed_cells_and_the_type_model():
    class Stage:  # what a loaded CellTypeRecord offers bag_score
        types, disease, cut = ["blast", "lymph"], ["blast"], 0.5

    spec = BagTask.model_construct(positive="APL", aggregator="mean", cells="typed", params={})
    spec.cell_types = Stage()
    T = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    p = np.array([0.8, 0.1, 0.6])
    assert bag_score(spec, p, T) == pytest.approx(0.7)  # the blasts only
    with pytest.raises(ValueError, match="type probabilities"):
        bag_score(spec, p, None)
    rng = np.random.default_rng(0)
    prof = rng.normal(size=(40, 5))
    y = (prof[:, 2] > 0).astype(int)
    agg = TypeModelAggregator().fit(prof, y)
    Stage.type_model_ = agg.linear()
    spec2 = BagTask.model_construct(positive="APL", aggregator="type_model", cells="all")
    spec2.cell_types = Stage()
    want = agg.score(type_profile(T, p)[None])[0]
    assert bag_score(spec2, p, T) == pytest.approx(want, abs=1e-9)


def test_an_empty_band_refers_nobody():
    from ensembles.bags import bag_decision

    empty = BagTask(
        positive="APL",
        aggregator="mean",
        threshold=0.5,
        refer_band=refer_band(np.array([0.1, 0.9]), np.array([False, True]), 0.5, 0.25),
    ).refer_band
    assert empty.model_extra["n_inside"] == 0
    assert bag_decision(0.5, 10, "APL", "AML", 0.5, 1, empty)[0] == "APL"
    held = BagTask(
        positive="APL", aggregator="mean", threshold=0.5, refer_band={"lo": 0.4, "hi": 0.6}
    ).refer_band  # saved before refer_rate: no count, a band
    assert bag_decision(0.5, 10, "APL", "AML", 0.5, 1, held)[0] == "refer"
